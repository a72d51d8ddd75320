//! The fault harness: a UDP proxy that stands between an agent and the exchange on
//! loopback and misbehaves on command, and a checker that compares what a source
//! produced with what the exchange stored.
//!
//! The proxy also forwards TCP on the same port number (the agent's fallback
//! when UDP is blocked goes through it too): [`UdpProxy::block_udp`] drops every
//! datagram while TCP passes; a cut stalls TCP (nothing is read or forwarded
//! until it is restored) as it black-holes UDP.
//!
//! The proxy forwards every datagram through one scheduler, so each can be
//! dropped, delayed, duplicated or held back (reordered) independently, in both
//! directions, and the whole link can be cut (black-holed) and restored. It never
//! binds anything but 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::append_lines;

/// How the link misbehaves; applied to each datagram, in both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Probability a datagram is dropped.
    pub drop: f64,
    /// Probability a datagram is sent twice.
    pub duplicate: f64,
    /// Every datagram waits this long.
    pub delay: Duration,
    /// Plus a uniformly random extra wait up to this.
    pub jitter: Duration,
    /// Probability a datagram is held back a further `delay + 20 ms`, so that
    /// later ones overtake it.
    pub reorder: f64,
    /// Black hole: nothing passes.
    pub cut: bool,
}

/// What the proxy did, for the report.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    /// Bytes of the datagrams clients sent toward the upstream (before faults).
    pub upstream_bytes: AtomicU64,
}

impl fmt::Display for ProxyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "forwarded {}, dropped {}, duplicated {}, reordered {}",
            self.forwarded.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.duplicated.load(Ordering::Relaxed),
            self.reordered.load(Ordering::Relaxed)
        )
    }
}

struct Pending {
    due: Instant,
    n: u64,
    from: Arc<UdpSocket>,
    to: SocketAddr,
    bytes: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.n) == (o.due, o.n)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.n).cmp(&(o.due, o.n))
    }
}

struct Shared {
    faults: Mutex<Faults>,
    queue: Mutex<BinaryHeap<Reverse<Pending>>>,
    wake: Condvar,
    stop: AtomicBool,
    seq: AtomicU64,
    stats: ProxyStats,
    udp_blocked: AtomicBool,
}

impl Shared {
    /// Decides the fate of one datagram and queues what survives.
    fn offer(&self, from: &Arc<UdpSocket>, to: SocketAddr, bytes: &[u8]) {
        let f = *self.faults.lock().unwrap();
        let mut rng = rand::rng();
        if f.cut
            || self.udp_blocked.load(Ordering::Relaxed)
            || rng.random_bool(f.drop.clamp(0.0, 1.0))
        {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let copies = if rng.random_bool(f.duplicate.clamp(0.0, 1.0)) {
            self.stats.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        let now = Instant::now();
        let mut q = self.queue.lock().unwrap();
        for _ in 0..copies {
            let mut wait = f.delay;
            if !f.jitter.is_zero() {
                wait += f.jitter.mul_f64(rng.random::<f64>());
            }
            if rng.random_bool(f.reorder.clamp(0.0, 1.0)) {
                wait += f.delay + Duration::from_millis(20);
                self.stats.reordered.fetch_add(1, Ordering::Relaxed);
            }
            q.push(Reverse(Pending {
                due: now + wait,
                n: self.seq.fetch_add(1, Ordering::Relaxed),
                from: Arc::clone(from),
                to,
                bytes: bytes.to_vec(),
            }));
        }
        drop(q);
        self.wake.notify_one();
    }

    /// Sends queued datagrams when they are due.
    fn run_scheduler(&self) {
        let mut q = self.queue.lock().unwrap();
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            match q.peek() {
                Some(Reverse(p)) if p.due <= now => {
                    let Reverse(p) = q.pop().unwrap();
                    drop(q);
                    // A cut also swallows what was already in flight.
                    if self.faults.lock().unwrap().cut {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let _ = p.from.send_to(&p.bytes, p.to);
                        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                    q = self.queue.lock().unwrap();
                }
                Some(Reverse(p)) => {
                    let wait = p.due - now;
                    q = self.wake.wait_timeout(q, wait).unwrap().0;
                }
                None => {
                    q = self
                        .wake
                        .wait_timeout(q, Duration::from_millis(50))
                        .unwrap()
                        .0;
                }
            }
        }
    }
}

/// A misbehaving UDP link: agents connect to [`UdpProxy::address`], the proxy
/// talks to `upstream`.
pub struct UdpProxy {
    pub port: u16,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpProxy {
    pub fn start(upstream: SocketAddr) -> UdpProxy {
        assert!(
            upstream.ip().is_loopback(),
            "the fault proxy only works on loopback"
        );
        // One port number for both: a UDP port whose TCP twin is free.
        let (listen, tcp) = (0..100)
            .find_map(|_| {
                let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
                let port = udp.local_addr().ok()?.port();
                let tcp = TcpListener::bind(("127.0.0.1", port)).ok()?;
                Some((Arc::new(udp), tcp))
            })
            .expect("a loopback port free for both UDP and TCP");
        listen
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        roomy(&listen);
        tcp.set_nonblocking(true).unwrap();
        let port = listen.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            queue: Mutex::new(BinaryHeap::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            stats: ProxyStats::default(),
            udp_blocked: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        {
            let s = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name("proxy-scheduler".into())
                    .spawn(move || s.run_scheduler())
                    .unwrap(),
            );
        }
        {
            let s = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name("proxy-clients".into())
                    .spawn(move || client_side(&s, &listen, upstream))
                    .unwrap(),
            );
        }
        {
            let s = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name("proxy-tcp".into())
                    .spawn(move || tcp_side(&s, &tcp, upstream))
                    .unwrap(),
            );
        }
        UdpProxy {
            port,
            shared,
            threads,
        }
    }

    /// Drops every datagram (both ways) while `blocked`; TCP still passes.
    pub fn block_udp(&self, blocked: bool) {
        self.shared.udp_blocked.store(blocked, Ordering::Relaxed);
    }

    /// `host:port` for the agent's `[exchange] address`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn set(&self, faults: Faults) {
        *self.shared.faults.lock().unwrap() = faults;
    }

    pub fn cut(&self, cut: bool) {
        self.shared.faults.lock().unwrap().cut = cut;
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }

    /// Datagrams the kernel dropped at the proxy's listening socket because
    /// its receive buffer was full (the `drops` column of `/proc/net/udp`):
    /// sent by the client, never seen by the proxy.
    pub fn kernel_drops(&self) -> u64 {
        let port = format!(":{:04X} ", self.port);
        std::fs::read_to_string("/proc/net/udp")
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| format!("{a} ").ends_with(&port))
            })
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Receive buffers deep enough that the proxy itself drops nothing while its
/// threads wait for a core (only `Faults` decide what is lost): the default
/// 208 KiB overflows under a burst on a busy 2-core machine, and the sender's
/// retransmissions then count twice against a bandwidth cap. As root the
/// system's `rmem_max` does not bound it (SO_RCVBUFFORCE).
fn roomy(sock: &UdpSocket) {
    use std::os::fd::AsRawFd as _;
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on an open socket with a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

/// Client → exchange: one upstream socket per client address (an agent opens a
/// new UDP socket for every connection), each with a thread for the replies.
fn client_side(s: &Arc<Shared>, listen: &Arc<UdpSocket>, upstream: SocketAddr) {
    let mut peers: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut repliers: Vec<JoinHandle<()>> = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !s.stop.load(Ordering::Relaxed) {
        let (n, client) = match listen.recv_from(&mut buf) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let up = peers.entry(client).or_insert_with(|| {
            let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            roomy(&sock);
            let (s2, sock2, listen2) = (Arc::clone(s), Arc::clone(&sock), Arc::clone(listen));
            repliers.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !s2.stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = sock2.recv_from(&mut buf) {
                        if from == upstream {
                            s2.offer(&listen2, client, &buf[..n]);
                        }
                    }
                }
            }));
            sock
        });
        let up = Arc::clone(up);
        s.stats
            .upstream_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        s.offer(&up, upstream, &buf[..n]);
    }
    for r in repliers {
        let _ = r.join();
    }
}

/// TCP on the same port: each accepted connection is joined to a new one to
/// `upstream`, one thread per direction.
fn tcp_side(s: &Arc<Shared>, listen: &TcpListener, upstream: SocketAddr) {
    let mut pipes: Vec<JoinHandle<()>> = Vec::new();
    while !s.stop.load(Ordering::Relaxed) {
        let client = match listen.accept() {
            Ok((c, _)) => c,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let Ok(up) = TcpStream::connect(upstream) else {
            continue;
        };
        client.set_nonblocking(false).unwrap();
        for (from, to) in [
            (client.try_clone().unwrap(), up.try_clone().unwrap()),
            (up, client),
        ] {
            let s = Arc::clone(s);
            pipes.push(std::thread::spawn(move || pipe(&s, from, to)));
        }
    }
    for p in pipes {
        let _ = p.join();
    }
}

/// Copies one direction until end of stream; while the link is cut, reads
/// nothing (TCP's flow control holds the sender).
fn pipe(s: &Shared, mut from: TcpStream, mut to: TcpStream) {
    from.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    while !s.stop.load(Ordering::Relaxed) {
        if s.faults.lock().unwrap().cut {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

// ---------------------------------------------------------------------------------
// The checker
// ---------------------------------------------------------------------------------

/// A numbered line the checker can verify: `<tag>-<index>-<digest of both>`.
pub fn checked_line(tag: &str, i: usize) -> String {
    format!("{tag}-{i:08}-{:08x}", line_digest(tag, i))
}

/// A [`checked_line`] with 96 more characters that do not compress well, so that
/// a batch of them is large.
pub fn long_line(tag: &str, i: usize) -> String {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let noise: String = (0..96)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"0123456789abcdefghijklmnopqrstuvwxyz"[(x % 36) as usize])
        })
        .collect();
    format!("{}-{noise}", checked_line(tag, i))
}

fn line_digest(tag: &str, i: usize) -> u32 {
    crc32fast_like(format!("{tag}/{i}").as_bytes())
}

/// A small stable checksum (FNV-1a), enough to notice an altered line.
fn crc32fast_like(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, &x| {
        (h ^ u32::from(x)).wrapping_mul(0x0100_0193)
    })
}

/// What the exchange holds compared with what was produced, record by record.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub produced: usize,
    pub stored: usize,
    pub missing: usize,
    pub duplicated: usize,
    pub out_of_order: usize,
    pub altered: usize,
    /// Indexes of the lines never stored.
    pub missing_indexes: Vec<usize>,
    /// The first few problems, for the message.
    pub examples: Vec<String>,
}

impl Verdict {
    /// Compares `produced` lines (made by [`checked_line`] with indexes `0..`) with
    /// what the exchange stored, in seq order.
    pub fn of_lines(tag: &str, produced: usize, stored: &[String]) -> Verdict {
        Self::of_lines_made(tag, produced, stored, |i| checked_line(tag, i))
    }

    /// [`Self::of_lines`] for lines made by `make` (e.g. [`long_line`]).
    pub fn of_lines_made(
        tag: &str,
        produced: usize,
        stored: &[String],
        make: impl Fn(usize) -> String,
    ) -> Verdict {
        let mut v = Verdict {
            produced,
            stored: stored.len(),
            ..Verdict::default()
        };
        let mut seen = vec![false; produced];
        let mut last: Option<usize> = None;
        for (pos, text) in stored.iter().enumerate() {
            let idx = text
                .strip_prefix(tag)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|r| r.split('-').next())
                .and_then(|n| n.parse::<usize>().ok());
            let Some(idx) = idx.filter(|&i| i < produced && *text == make(i)) else {
                v.altered += 1;
                v.example(format!(
                    "seq {}: {text:?} is not a line that was written",
                    pos + 1
                ));
                continue;
            };
            if seen[idx] {
                v.duplicated += 1;
                v.example(format!("seq {}: line {idx} again", pos + 1));
                continue;
            }
            seen[idx] = true;
            if last.is_some_and(|l| idx < l) {
                v.out_of_order += 1;
                v.example(format!(
                    "seq {}: line {idx} after line {}",
                    pos + 1,
                    last.unwrap_or(0)
                ));
            }
            last = Some(idx);
        }
        let missing: Vec<usize> = (0..produced).filter(|&i| !seen[i]).collect();
        v.missing = missing.len();
        v.missing_indexes = missing.clone();
        if let (Some(a), Some(b)) = (missing.first(), missing.last()) {
            v.example(format!(
                "missing: {} lines between {a} and {b}",
                missing.len()
            ));
        }
        v
    }

    fn example(&mut self, e: String) {
        if self.examples.len() < 5 {
            self.examples.push(e);
        }
    }

    pub fn is_clean(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.altered == 0
    }

    /// Prints the verdict and fails the test unless nothing was lost, duplicated,
    /// reordered or altered.
    pub fn assert_clean(&self, scenario: &str) {
        crate::note(format!("verdict, {scenario}: {self}"));
        assert!(self.is_clean(), "{scenario}: {self}");
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "produced {}, stored {}: {} lost, {} duplicated, {} out of order, {} altered",
            self.produced,
            self.stored,
            self.missing,
            self.duplicated,
            self.out_of_order,
            self.altered
        )?;
        for e in &self.examples {
            write!(f, "; {e}")?;
        }
        Ok(())
    }
}

/// The checker fed one stored line at a time, for runs too long to hold in memory.
pub struct LineChecker {
    tag: String,
    seen: Vec<bool>,
    last: Option<usize>,
    v: Verdict,
}

impl LineChecker {
    pub fn new(tag: &str) -> Self {
        LineChecker {
            tag: tag.to_string(),
            seen: Vec::new(),
            last: None,
            v: Verdict::default(),
        }
    }

    /// One stored line (made by [`checked_line`]), in seq order.
    pub fn feed(&mut self, seq: u64, text: &str) {
        self.v.stored += 1;
        let idx = text
            .strip_prefix(self.tag.as_str())
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split('-').next())
            .and_then(|n| n.parse::<usize>().ok());
        let Some(idx) = idx.filter(|&i| text == checked_line(&self.tag, i)) else {
            self.v.altered += 1;
            self.v.example(format!(
                "seq {seq}: {text:?} is not a line that was written"
            ));
            return;
        };
        if idx >= self.seen.len() {
            self.seen.resize(idx + 1, false);
        }
        if self.seen[idx] {
            self.v.duplicated += 1;
            self.v.example(format!("seq {seq}: line {idx} again"));
            return;
        }
        self.seen[idx] = true;
        if self.last.is_some_and(|l| idx < l) {
            self.v.out_of_order += 1;
            self.v.example(format!(
                "seq {seq}: line {idx} after line {}",
                self.last.unwrap_or(0)
            ));
        }
        self.last = Some(idx);
    }

    pub fn stored(&self) -> usize {
        self.v.stored
    }

    /// The verdict once `produced` lines were written in all.
    pub fn finish(mut self, produced: usize) -> Verdict {
        self.v.produced = produced;
        self.seen.resize(produced.max(self.seen.len()), false);
        let missing: Vec<usize> = (0..produced).filter(|&i| !self.seen[i]).collect();
        self.v.missing = missing.len();
        if let (Some(a), Some(b)) = (missing.first(), missing.last()) {
            self.v.example(format!(
                "missing: {} lines between {a} and {b}",
                missing.len()
            ));
        }
        self.v.missing_indexes = missing;
        self.v
    }
}

/// True when long variants of the fault scenarios were asked for (`FERRY_SOAK=1`).
pub fn soak() -> bool {
    std::env::var("FERRY_SOAK").is_ok_and(|v| v == "1")
}

/// Appends checked lines (`checked_line(tag, i)`) at about `rate` per second
/// until stopped.
pub struct LineWriter {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicUsize>,
    handle: Option<JoinHandle<()>>,
}

impl LineWriter {
    pub fn start(log: PathBuf, tag: &str, rate: usize) -> LineWriter {
        let tag = tag.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicUsize::new(0));
        let (s, w) = (stop.clone(), written.clone());
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            while !s.load(Ordering::SeqCst) {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as usize;
                let from = w.load(Ordering::SeqCst);
                if due > from {
                    let lines: Vec<String> = (from..due).map(|i| checked_line(&tag, i)).collect();
                    append_lines(&log, &lines);
                    w.store(due, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        LineWriter {
            stop,
            written,
            handle: Some(handle),
        }
    }

    pub fn written(&self) -> usize {
        self.written.load(Ordering::SeqCst)
    }

    pub fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("writer thread");
        }
        self.written()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_sees_every_kind_of_damage() {
        let good: Vec<String> = (0..10).map(|i| checked_line("t", i)).collect();
        assert!(Verdict::of_lines("t", 10, &good).is_clean());
        let mut bad = good.clone();
        bad.remove(3); // lost
        bad.push(good[5].clone()); // duplicated (and late)
        bad.swap(0, 1); // out of order
        bad[6] = bad[6].replace('-', "_"); // altered
        let v = Verdict::of_lines("t", 10, &bad);
        assert_eq!(
            (v.missing, v.duplicated, v.out_of_order, v.altered),
            (2, 1, 1, 1),
            "{v}"
        );
    }

    #[test]
    fn the_proxy_drops_duplicates_and_cuts() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let proxy = UdpProxy::start(server.local_addr().unwrap());
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let count = |n: usize| {
            for i in 0..n {
                client
                    .send_to(&i.to_be_bytes(), ("127.0.0.1", proxy.port))
                    .unwrap();
            }
            let mut got = 0;
            let mut buf = [0u8; 64];
            while server.recv_from(&mut buf).is_ok() {
                got += 1;
            }
            got
        };
        assert_eq!(count(50), 50);
        proxy.set(Faults {
            duplicate: 1.0,
            ..Faults::default()
        });
        assert_eq!(count(50), 100);
        proxy.set(Faults {
            drop: 1.0,
            ..Faults::default()
        });
        assert_eq!(count(50), 0);
        proxy.set(Faults::default());
        proxy.cut(true);
        assert_eq!(count(50), 0);
        proxy.cut(false);
        assert_eq!(count(10), 10);
    }
}
