//! `js-bench`: agent → exchange → JetStream next to a plain JetStream publisher
//! with the same durable settings and message sizes, in the same run.
//!
//! ```text
//! cargo build --release --bins && target/release/js-bench --runs 3 --lines 2000000 --streams 4
//! ```
//!
//! One throwaway nats-server 2.15 (`ferry_tests::nats`, `sync_interval: always`:
//! every acknowledged message is fsynced). Per run:
//!
//! * Ferry: a fresh `ferry-exchange` with `[store] kind = "jetstream"` and one
//!   agent with `--streams` tail streams, each a pre-written log of
//!   `--lines / --streams` log-like 256-byte lines (as `ferry-bench` writes them,
//!   zstd ratio about 3.5): lines/s from agent start until the
//!   exchange acknowledged every line (stored and acknowledged by JetStream).
//!   The messages and bytes the exchange published are read from the stream's
//!   info afterwards.
//! * Ceiling: a plain async-nats publisher into a fresh stream on the same
//!   server, publishing the same number of messages of the same average size on
//!   as many subjects, each publish conditional on its subject's last sequence
//!   (`Nats-Expected-Last-Subject-Sequence`, so one in flight per subject, as the
//!   exchange must), subjects in parallel: messages/s, reported as the lines/s
//!   those messages carried in the Ferry run.
//!
//! The report prints medians and every run, as markdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_tests::bench::{bin, median, write_log, Pair, LINE_LEN};
use ferry_tests::nats::NatsServer;

/// One run: (Ferry lines/s, ceiling lines/s, messages, average message size).
type RunFigures = (f64, f64, u64, usize);

/// (messages, bytes) of a JetStream stream, from the monitoring endpoint.
fn stream_totals(nats: &NatsServer, stream: &str) -> Result<(u64, u64)> {
    let host = nats.monitor().trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&host)?;
    write!(s, "GET /jsz?streams=true HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body)?;
    let json = body.split("\r\n\r\n").nth(1).context("no /jsz body")?;
    let v: serde_json::Value = serde_json::from_str(json)?;
    for acc in v["account_details"].as_array().into_iter().flatten() {
        for st in acc["stream_detail"].as_array().into_iter().flatten() {
            if st["name"] == stream {
                return Ok((
                    st["state"]["messages"].as_u64().unwrap_or(0),
                    st["state"]["bytes"].as_u64().unwrap_or(0),
                ));
            }
        }
    }
    bail!("stream {stream} not in /jsz")
}

fn ferry_run(
    dir: &Path,
    nats: &NatsServer,
    stream: &str,
    lines: u64,
    streams: usize,
) -> Result<f64> {
    std::fs::create_dir_all(dir)?;
    let per = lines / streams as u64;
    let mut cfg = String::new();
    for s in 0..streams {
        let log = dir.join(format!("app-{s}.log"));
        write_log(&log, per)?;
        cfg.push_str(&format!(
            "[[stream]]\nname = \"log{s}\"\ncatalog_id = \"BENCH-JS\"\nsharing = \"unconditional\"\nsource = {{ kind = \"tail\", path = \"{}\" }}\n",
            log.display()
        ));
    }
    let (url, monitor) = (nats.url(), nats.monitor());
    let mut pair = Pair::with_exchange(dir, &cfg, |c| {
        c.lines()
            .filter(|l| !l.trim_start().starts_with("kind = "))
            .collect::<Vec<_>>()
            .join("\n")
            .replace(
                "[store]\n",
                &format!("[store]\nkind = \"jetstream\"\nurl = \"{url}\"\nmonitor = \"{monitor}\"\nstream = \"{stream}\"\n"),
            )
    })?;
    let start = Instant::now();
    pair.start_agent()?;
    let sock = dir.join("ag/data/agent.sock");
    loop {
        let acked: u64 = status_streams(&sock)
            .iter()
            .map(|s| s["acked_seq"].as_u64().unwrap_or(0))
            .sum();
        if acked >= per * streams as u64 {
            break;
        }
        if start.elapsed() > Duration::from_secs(1800) {
            bail!("timed out; logs in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(start.elapsed().as_secs_f64())
}

fn status_streams(sock: &Path) -> Vec<serde_json::Value> {
    use std::io::Read;
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return Vec::new();
    };
    if s.write_all(b"status\n").is_err() {
        return Vec::new();
    }
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    serde_json::from_slice::<serde_json::Value>(&reply)
        .ok()
        .and_then(|v| v["streams"].as_array().cloned())
        .unwrap_or_default()
}

/// Publishes `messages` messages of `size` bytes over `subjects` subjects, each
/// conditional on its subject's last sequence; seconds.
async fn ceiling(
    url: &str,
    stream: &str,
    subjects: usize,
    messages: u64,
    size: usize,
) -> Result<f64> {
    use async_nats::jetstream;
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    js.create_stream(jetstream::stream::Config {
        name: stream.to_string(),
        subjects: vec![format!("{stream}.>")],
        ..Default::default()
    })
    .await?;
    let per = messages.div_ceil(subjects as u64);
    let payload: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..subjects {
        let js = js.clone();
        let payload = payload.clone();
        let subject = format!("{stream}.s{s}");
        tasks.push(tokio::spawn(async move {
            let mut last = 0u64;
            for _ in 0..per {
                let mut h = async_nats::HeaderMap::new();
                h.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    last.to_string().as_str(),
                );
                let ack = js
                    .publish_with_headers(subject.clone(), h, payload.clone().into())
                    .await?
                    .await?;
                last = ack.sequence;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let mut runs = 3usize;
    let mut lines = 2_000_000u64;
    let mut streams = 4usize;
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
            "--streams" => streams = val()?.max(1) as usize,
            other => bail!("unknown argument {other}; use --runs N --lines N --streams N"),
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
        .prefix("ferry-js-bench")
        .tempdir_in(std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))?;
    let nats = NatsServer::start();
    let rt = tokio::runtime::Runtime::new()?;
    let lines = lines / streams as u64 * streams as u64;
    let mut results = Vec::new();
    for r in 0..runs {
        eprintln!("run {}/{runs}", r + 1);
        let stream = format!("FERRY{r}");
        let secs = ferry_run(
            &base.path().join(format!("run-{r}")),
            &nats,
            &stream,
            lines,
            streams,
        )?;
        let (messages, bytes) = stream_totals(&nats, &stream)?;
        let size = (bytes / messages.max(1)) as usize;
        eprintln!("  ferry {secs:.2} s: {messages} messages, {size} bytes each on average");
        let ceiling_secs = rt.block_on(ceiling(
            &nats.url(),
            &format!("CEIL{r}"),
            streams,
            messages,
            size,
        ))?;
        eprintln!("  ceiling {ceiling_secs:.2} s");
        results.push((
            lines as f64 / secs,
            lines as f64 / ceiling_secs,
            messages,
            size,
        ));
    }
    let col = |f: &dyn Fn(&RunFigures) -> f64| median(&results.iter().map(f).collect::<Vec<_>>());
    let all = |f: &dyn Fn(&RunFigures) -> f64, p: usize| {
        results
            .iter()
            .map(|r| format!("{:.*}", p, f(r)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "{lines} lines of {LINE_LEN} bytes over {streams} streams, {runs} runs, nats-server `sync_interval: always`\n"
    );
    println!("| | median | runs |\n| --- | --- | --- |");
    println!(
        "| plain JetStream publisher, same messages (ceiling) | {:.0} lines/s | {} |",
        col(&|r| r.1),
        all(&|r| r.1, 0)
    );
    println!(
        "| agent → exchange → JetStream | {:.0} lines/s | {} |",
        col(&|r| r.0),
        all(&|r| r.0, 0)
    );
    println!(
        "| ratio | {:.2} | {} |",
        col(&|r| r.0 / r.1),
        all(&|r| r.0 / r.1, 2)
    );
    println!(
        "| messages per run, average size | {:.0}, {:.0} bytes | |",
        col(&|r| r.2 as f64),
        col(&|r| r.3 as f64)
    );
    Ok(())
}
