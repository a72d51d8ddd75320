//! `ferry-bench`: end-to-end figures for BENCHMARKS.md, each next to the physical
//! limit measured in the same run.
//!
//! ```text
//! cargo build --release --bins && cargo run --release -p ferry-tests --bin ferry-bench -- --runs 3
//! ```
//!
//! Per run:
//! * `fdatasync/s`: 4 KiB appends + fdatasync for 3 s, in the bench directory.
//! * `ceiling`: the agent's pipeline without disk, in one process: read the log,
//!   split lines, batch (≤ 4000 lines, written into the batch bytes with their
//!   positions as the tail source does), zstd, QUIC (the same rustls/quinn
//!   configuration, mutual TLS, loopback), decompress and check as the exchange
//!   does, cumulative ack. Records/s.
//! * `raw quinn`: the link alone: the same compressed batches sent again and again
//!   over the same QUIC/TLS configuration and acked without decoding.
//! * `tail e2e`: real `ferry-exchange` + `ferry-agent` processes (release build),
//!   both durable, shipping a pre-written log of 256-byte lines: records/s from
//!   agent start until the exchange acknowledged the last line.
//! * `files e2e`: the same for 1 GiB of random files through a directory stream: MB/s.
//! * `latency`: lines appended at 20,000/s for 10 s, each carrying its append time;
//!   latency = exchange store time − append time (1 ms resolution), p50/p99, and
//!   agent RSS under that load and idle.
//!
//! The report prints medians and every run, as markdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use ferry_tests::bench::{bin, median, rss_kib, write_log, Pair, LINE_LEN};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Raw fdatasync rate of 4 KiB appends.
fn fdatasync_rate(dir: &Path) -> Result<f64> {
    let path = dir.join("fsync.probe");
    let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
    let block = vec![7u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(path)?;
    Ok(rate)
}

/// A stream's records as the exchange's `records` command prints them.
fn records(pair: &Pair, stream: &str) -> Result<Vec<serde_json::Value>> {
    let out = std::process::Command::new(bin("ferry-exchange"))
        .args([
            "records", "--agent", "bench", "--stream", stream, "--config",
        ])
        .arg(pair.dir.join("ex/exchange.toml"))
        .output()?;
    Ok(out
        .stdout
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect())
}

struct E2e {
    rate: f64,
    agent_hwm_kib: u64,
    exchange_hwm_kib: u64,
}

fn tail_e2e(dir: &Path, log: &Path, lines: u64) -> Result<E2e> {
    let streams = format!(
        "[[stream]]\nname = \"log\"\ncatalog_id = \"BENCH-1\"\nsharing = \"unconditional\"\nsource = {{ kind = \"tail\", path = \"{}\" }}\n",
        log.display()
    );
    let mut pair = Pair::new(dir, &streams)?;
    let start = Instant::now();
    let pid = pair.start_agent()?;
    pair.wait("the last ack", Duration::from_secs(600), |s| {
        s["acked_seq"].as_u64() >= Some(lines)
    })?;
    let secs = start.elapsed().as_secs_f64();
    Ok(E2e {
        rate: lines as f64 / secs,
        agent_hwm_kib: rss_kib(pid, "VmHWM"),
        exchange_hwm_kib: rss_kib(pair.exchange.0.id(), "VmHWM"),
    })
}

fn files_e2e(dir: &Path, pool: &Path, total_bytes: u64) -> Result<E2e> {
    let outbox = dir.join("outbox");
    std::fs::create_dir_all(&outbox)?;
    let mut chunks = 0u64;
    for e in std::fs::read_dir(pool)? {
        let e = e?;
        std::fs::hard_link(e.path(), outbox.join(e.file_name()))?;
        chunks += e.metadata()?.len().div_ceil(1 << 20).max(1);
    }
    let streams = format!(
        "[[stream]]\nname = \"files\"\ncatalog_id = \"BENCH-2\"\nsharing = \"unconditional\"\nsource = {{ kind = \"directory\", path = \"{}\", complete = \"rename\" }}\n",
        outbox.display()
    );
    let mut pair = Pair::new(dir, &streams)?;
    let start = Instant::now();
    let pid = pair.start_agent()?;
    pair.wait("the last ack", Duration::from_secs(600), |s| {
        s["acked_seq"].as_u64() >= Some(chunks)
    })?;
    let secs = start.elapsed().as_secs_f64();
    Ok(E2e {
        rate: total_bytes as f64 / secs / 1e6,
        agent_hwm_kib: rss_kib(pid, "VmHWM"),
        exchange_hwm_kib: rss_kib(pair.exchange.0.id(), "VmHWM"),
    })
}

struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
    agent_rss_load_kib: u64,
    agent_rss_idle_kib: u64,
    /// The slowest 4 KiB append + fdatasync of a probe running beside the
    /// pipeline (one every 10 ms, same filesystem), in ms: a stall of the disk
    /// shows here too.
    disk_max: f64,
}

/// Times 4 KiB append + fdatasync every 10 ms until `stop`; returns the slowest.
fn disk_probe(dir: &Path, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<f64> {
    let path = dir.join("stall.probe");
    let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
    let block = vec![3u8; 4096];
    let mut worst = 0f64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        worst = worst.max(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_file(path)?;
    Ok(worst)
}

fn latency(dir: &Path, rate: u64, secs: u64) -> Result<Latency> {
    std::fs::create_dir_all(dir)?;
    let log = dir.join("paced.log");
    File::create(&log)?;
    let streams = format!(
        "[[stream]]\nname = \"paced\"\ncatalog_id = \"BENCH-3\"\nsharing = \"unconditional\"\nsource = {{ kind = \"tail\", path = \"{}\" }}\n",
        log.display()
    );
    let mut pair = Pair::new(dir, &streams)?;
    let pid = pair.start_agent()?;
    std::thread::sleep(Duration::from_secs(1));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (dir, stop) = (dir.to_path_buf(), stop.clone());
        std::thread::spawn(move || disk_probe(&dir, stop))
    };
    let mut f = OpenOptions::new().append(true).open(&log)?;
    let total = rate * secs;
    let start = Instant::now();
    let mut written = 0u64;
    let mut load_rss = 0;
    while written < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        if due > written {
            let mut buf = String::new();
            let t = now_ms();
            for i in written..due {
                buf.push_str(&format!("{t} {i:010} {}\n", "y".repeat(200)));
            }
            f.write_all(buf.as_bytes())?;
            written = due;
        }
        if written > total / 2 && load_rss == 0 {
            load_rss = rss_kib(pid, "VmRSS");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    pair.wait("the last ack", Duration::from_secs(120), |s| {
        s["acked_seq"].as_u64() >= Some(total)
    })?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let disk_max = probe
        .join()
        .map_err(|_| anyhow::anyhow!("the disk probe panicked"))??;
    std::thread::sleep(Duration::from_secs(3));
    let idle_rss = rss_kib(pid, "VmRSS");
    let mut lat: Vec<f64> = Vec::new();
    for r in records(&pair, "paced")? {
        let Some(text) = r["text"].as_str() else {
            continue;
        };
        let appended: u64 = text
            .split(' ')
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let stored = r["stored"]
            .as_str()
            .and_then(|s| humantime::parse_rfc3339(s).ok());
        if let Some(stored) = stored {
            let stored_ms = stored.duration_since(UNIX_EPOCH)?.as_millis() as u64;
            lat.push(stored_ms.saturating_sub(appended) as f64);
        }
    }
    if lat.len() as u64 != total {
        bail!("expected {total} records, the exchange holds {}", lat.len());
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Ok(Latency {
        p50: pct(0.50),
        p99: pct(0.99),
        max: *lat.last().unwrap(),
        agent_rss_load_kib: load_rss,
        agent_rss_idle_kib: idle_rss,
        disk_max,
    })
}

fn main() -> Result<()> {
    let mut runs = 3usize;
    let mut lines = 2_000_000u64;
    let mut file_mb = 1024u64;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .context("missing value")
                .and_then(|v| v.parse::<u64>().context("not a number"))
        };
        match a.as_str() {
            "--runs" => runs = val()? as usize,
            "--lines" => lines = val()?,
            "--file-mb" => file_mb = val()?,
            "--only" => only = Some(args.next().context("missing value")?),
            other => bail!(
                "unknown argument {other}; use --runs N --lines N --file-mb N --only tail|files|latency"
            ),
        }
    }
    for b in ["ferry-agent", "ferry-exchange"] {
        if !bin(b).exists() {
            bail!(
                "{} is missing: run `cargo build --release --bins` first",
                bin(b).display()
            );
        }
    }
    let base = tempfile::Builder::new()
        .prefix("ferry-bench")
        .tempdir_in(std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))?;
    let log = base.path().join("lines.log");
    write_log(&log, lines)?;
    let pool = base.path().join("pool");
    std::fs::create_dir_all(&pool)?;
    let per_file = 256u64 << 20;
    let nfiles = (file_mb << 20).div_ceil(per_file).max(1);
    for i in 0..nfiles {
        let mut f = std::io::BufWriter::new(File::create(pool.join(format!("file-{i}.bin")))?);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..(per_file >> 20) {
            rand::fill(&mut buf[..]);
            f.write_all(&buf)?;
        }
        f.flush()?;
    }
    let total_bytes = nfiles * per_file;

    if let Some(what) = only {
        // A quick look at one figure while working on it; BENCHMARKS.md takes the
        // full report, where every figure sits next to its ceiling.
        for r in 0..runs {
            let d = base.path().join(format!("{what}-{r}"));
            match what.as_str() {
                "tail" => {
                    let e = tail_e2e(&d, &log, lines)?;
                    println!(
                        "tail e2e: {:.0}k lines/s, agent peak RSS {} KiB, exchange {} KiB",
                        e.rate / 1000.0,
                        e.agent_hwm_kib,
                        e.exchange_hwm_kib
                    );
                }
                "files" => {
                    let e = files_e2e(&d, &pool, total_bytes)?;
                    println!(
                        "files e2e: {:.0} MB/s, agent peak RSS {} KiB, exchange {} KiB",
                        e.rate, e.agent_hwm_kib, e.exchange_hwm_kib
                    );
                }
                "latency" => {
                    let l = latency(&d, 20_000, 10)?;
                    println!(
                        "latency at 20k/s: p50 {} ms, p99 {} ms, max {} ms, agent RSS {} KiB under load, {} KiB idle; slowest fdatasync beside it {:.1} ms",
                        l.p50, l.p99, l.max, l.agent_rss_load_kib, l.agent_rss_idle_kib, l.disk_max
                    );
                }
                other => bail!("--only {other}: use tail, files or latency"),
            }
        }
        return Ok(());
    }

    let mut fsync = Vec::new();
    let mut ceiling = Vec::new();
    let mut raw_quinn = Vec::new();
    let mut tail = Vec::new();
    let mut files = Vec::new();
    let mut lat = Vec::new();
    for r in 0..runs {
        eprintln!("run {}/{runs}", r + 1);
        fsync.push(fdatasync_rate(base.path()).context("fdatasync probe")?);
        ceiling.push(ceiling::run(&log, lines, false).context("ceiling")?);
        raw_quinn.push(ceiling::run(&log, lines, true).context("raw quinn")?);
        let d = base.path().join(format!("tail-{r}"));
        tail.push(tail_e2e(&d, &log, lines).context("tail e2e")?);
        let d = base.path().join(format!("files-{r}"));
        files.push(files_e2e(&d, &pool, total_bytes).context("files e2e")?);
        let d = base.path().join(format!("lat-{r}"));
        lat.push(latency(&d, 20_000, 10).context("latency")?);
    }
    let list = |v: &[f64], fmt: &dyn Fn(f64) -> String| {
        v.iter().map(|x| fmt(*x)).collect::<Vec<_>>().join(", ")
    };
    let k = |x: f64| format!("{:.0}k", x / 1000.0);
    let tail_rates: Vec<f64> = tail.iter().map(|e| e.rate).collect();
    let ceil = ceiling.clone();
    let file_rates: Vec<f64> = files.iter().map(|e| e.rate).collect();
    println!("| figure | median | runs |");
    println!("| --- | --- | --- |");
    println!(
        "| raw fdatasync/s (4 KiB appends) | {:.0} | {} |",
        median(&fsync),
        list(&fsync, &|x| format!("{x:.0}"))
    );
    println!(
        "| ceiling: pipeline without disk, records/s | {} | {} |",
        k(median(&ceil)),
        list(&ceiling, &k)
    );
    println!(
        "| raw quinn: the same compressed batches re-sent, no decoding, records/s | {} | {} |",
        k(median(&raw_quinn)),
        list(&raw_quinn, &k)
    );
    let tm = median(&tail_rates);
    println!(
        "| tail e2e durable, 256-byte lines/s | {} ({:.2}× ceiling) | {} |",
        k(tm),
        tm / median(&ceil),
        list(&tail_rates, &k)
    );
    println!(
        "| directory e2e durable, MB/s | {:.0} | {} |",
        median(&file_rates),
        list(
            &files.iter().map(|e| e.rate).collect::<Vec<_>>(),
            &|x| format!("{x:.0}")
        )
    );
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    println!(
        "| agent peak RSS, tail e2e | {} | {} |",
        mib(tail.iter().map(|e| e.agent_hwm_kib).max().unwrap_or(0)),
        tail.iter()
            .map(|e| mib(e.agent_hwm_kib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| exchange peak RSS, tail e2e | {} | {} |",
        mib(tail.iter().map(|e| e.exchange_hwm_kib).max().unwrap_or(0)),
        tail.iter()
            .map(|e| mib(e.exchange_hwm_kib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| agent peak RSS, files e2e | {} | {} |",
        mib(files.iter().map(|e| e.agent_hwm_kib).max().unwrap_or(0)),
        files
            .iter()
            .map(|e| mib(e.agent_hwm_kib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| exchange peak RSS, files e2e | {} | {} |",
        mib(files.iter().map(|e| e.exchange_hwm_kib).max().unwrap_or(0)),
        files
            .iter()
            .map(|e| mib(e.exchange_hwm_kib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let p50: Vec<f64> = lat.iter().map(|l| l.p50).collect();
    let p99: Vec<f64> = lat.iter().map(|l| l.p99).collect();
    println!(
        "| latency at 20k lines/s, append→stored p50 (ms) | {:.0} | {} |",
        median(&p50),
        list(
            &lat.iter().map(|l| l.p50).collect::<Vec<_>>(),
            &|x| format!("{x:.0}")
        )
    );
    println!(
        "| latency at 20k lines/s, append→stored p99 (ms) | {:.0} | {} |",
        median(&p99),
        list(
            &lat.iter().map(|l| l.p99).collect::<Vec<_>>(),
            &|x| format!("{x:.0}")
        )
    );
    println!(
        "| latency max (ms) | | {} |",
        list(
            &lat.iter().map(|l| l.max).collect::<Vec<_>>(),
            &|x| format!("{x:.0}")
        )
    );
    println!(
        "| slowest 4 KiB fdatasync beside the latency run (ms) | | {} |",
        list(
            &lat.iter().map(|l| l.disk_max).collect::<Vec<_>>(),
            &|x| format!("{x:.1}")
        )
    );
    println!(
        "| agent RSS at 20k lines/s | | {} |",
        lat.iter()
            .map(|l| mib(l.agent_rss_load_kib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| agent RSS idle after | | {} |",
        lat.iter()
            .map(|l| mib(l.agent_rss_idle_kib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// The pipeline without disk: the agent's work from reading lines to receiving acks,
/// in one process over real QUIC with the same TLS configuration.
mod ceiling {
    use super::*;
    use std::fmt::Write as _;

    use ferry_protocol::batch::{check_batch, encode_buf};
    use ferry_protocol::frame::MAX_FRAME;
    use ferry_protocol::messages::{frame::Msg, Ack};
    use ferry_protocol::record_buf::RecordBuf;
    use ferry_transport::tls::{client_config, server_config, TlsFiles};
    use ferry_transport::{FrameReader, FrameWriter};

    const BATCH: usize = 4000;
    const WINDOW: u64 = 16;

    /// `raw`: the physical limit of the link instead: the first `WINDOW` batches are
    /// read and compressed once and sent over and over (new seqs, same bytes), and
    /// the receiver acks without decoding.
    pub fn run(log: &Path, lines: u64, raw: bool) -> Result<f64> {
        let dir = tempfile::tempdir()?;
        let ca = ferry_transport::pki::create_ca("bench CA")?;
        let server = ferry_transport::pki::issue_server(&ca, &["localhost".to_string()])?;
        let agent = ferry_transport::pki::issue_agent(&ca, "bench", "000000")?;
        for (n, v) in [
            ("ca.pem", &ca.cert_pem),
            ("s.pem", &server.cert_pem),
            ("s.key", &server.key_pem),
            ("a.pem", &agent.cert_pem),
            ("a.key", &agent.key_pem),
        ] {
            std::fs::write(dir.path().join(n), v)?;
        }
        let p = |n: &str| dir.path().join(n);
        let scfg = server_config(
            &TlsFiles {
                ca: &p("ca.pem"),
                cert: &p("s.pem"),
                key: &p("s.key"),
            },
            None,
        )?;
        let ccfg = client_config(&TlsFiles {
            ca: &p("ca.pem"),
            cert: &p("a.pem"),
            key: &p("a.key"),
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let log = log.to_path_buf();
        rt.block_on(async move {
            let server = quinn::Endpoint::server(scfg, "127.0.0.1:0".parse()?)?;
            let addr = server.local_addr()?;
            let receiver = tokio::spawn(async move {
                let conn = server.accept().await.context("no connection")?.await?;
                let (send, recv) = conn.accept_bi().await?;
                let mut w = FrameWriter::new(send);
                let mut r = FrameReader::new(recv, MAX_FRAME);
                while let Some(Msg::Batch(b)) = r.next().await? {
                    let count = if raw {
                        u64::from(b.record_count)
                    } else {
                        // What the exchange does with a batch of lines.
                        check_batch(&b)?.records as u64
                    };
                    let last = b.first_seq + count - 1;
                    w.send(Msg::Ack(Ack {
                        stream: b.stream,
                        up_to_seq: last,
                        ..Default::default()
                    }))
                    .await?;
                }
                anyhow::Ok(())
            });
            let client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            let start = Instant::now();
            let conn = client.connect_with(ccfg, addr, "localhost")?.await?;
            let (send, recv) = conn.open_bi().await?;
            let mut w = FrameWriter::new(send);
            let mut r = FrameReader::new(recv, MAX_FRAME);
            let mut reader = BufReader::with_capacity(1 << 20, File::open(&log)?);
            let mut seq = 1u64;
            let mut acked = 0u64;
            let mut in_flight = std::collections::VecDeque::new();
            let mut line = Vec::with_capacity(LINE_LEN);
            let mut position = String::new();
            let mut offset = 0u64;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut pre: Vec<ferry_protocol::batch::EncodedRecords> = Vec::new();
            let mut turn = 0usize;
            loop {
                let enc = if raw && pre.len() == WINDOW as usize {
                    let left = lines + 1 - seq;
                    if left == 0 {
                        break;
                    }
                    let mut enc = pre[turn % pre.len()].clone();
                    turn += 1;
                    if u64::from(enc.record_count) > left {
                        // The last batch: fewer records than the template says.
                        enc.record_count = left as u32;
                    }
                    enc
                } else {
                    // As the tail source builds a batch: records written straight
                    // into the batch bytes, each with its position.
                    let mut records = RecordBuf::with_capacity(BATCH * (LINE_LEN + 40));
                    while (records.count() as usize) < BATCH {
                        line.clear();
                        if reader.read_until(b'\n', &mut line)? == 0 {
                            break;
                        }
                        line.pop();
                        position.clear();
                        write!(position, "ino=1 off={offset}")?;
                        offset += line.len() as u64 + 1;
                        records.push_line(now_ms, &position, &line);
                    }
                    if records.is_empty() {
                        break;
                    }
                    let enc = encode_buf(&records)?;
                    if raw {
                        pre.push(enc.clone());
                    }
                    enc
                };
                let n = u64::from(enc.record_count);
                while in_flight.len() as u64 >= WINDOW {
                    if let Some(Msg::Ack(a)) = r.next().await? {
                        acked = a.up_to_seq;
                        while in_flight.front().is_some_and(|&l| l <= acked) {
                            in_flight.pop_front();
                        }
                    }
                }
                w.send(Msg::Batch(enc.into_batch("s".into(), seq))).await?;
                seq += n;
                in_flight.push_back(seq - 1);
            }
            while acked < seq - 1 {
                match r.next().await? {
                    Some(Msg::Ack(a)) => acked = a.up_to_seq,
                    _ => bail!("receiver ended early"),
                }
            }
            let secs = start.elapsed().as_secs_f64();
            w.finish().await;
            receiver.await??;
            if acked != lines {
                bail!("ceiling run acknowledged {acked} of {lines} lines");
            }
            Ok(lines as f64 / secs)
        })
    }
}
