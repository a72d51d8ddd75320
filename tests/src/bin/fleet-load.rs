//! `fleet-load`: many simulated agents against one exchange, each with its own
//! certificate, speaking the real protocol (see `ferry_tests::fleet`), while
//! the exchange's memory and its dashboard's answer times are measured.
//!
//! ```text
//! # against a running exchange (agents enrolled in-process with its CA):
//! fleet-load --config EXCHANGE_TOML --agents N --streams M --rate LINES_PER_SEC_TOTAL --seconds S
//!     [--batch LINES] [--line-bytes B] [--enroll-dir DIR] [--exchange-pid PID]
//!     [--dashboard https://127.0.0.1:PORT --user NAME --password-file F] [--requests 100]
//!     [--endpoints K] [--connect-parallel P] [--drain SECS]
//! # end to end, each run on a fresh exchange (init, dashboard, a user, serve, load, stop):
//! fleet-load bench --runs 3 --agents 1000 --streams 3 --rate 300000 --seconds 60 [--dir DIR] [--keep]
//! ```
//!
//! Prints one JSON object per run (agents connected, records acknowledged,
//! records/s in the load's window, errors, the exchange's RSS, p50/p99 of
//! `GET /api/overview`, `GET /api/agents` and the page `/`), and for `bench` the
//! medians.

#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_tests::fleet::dashboard::{pct, probe, Login};
use ferry_tests::fleet::{self, Counters, Enrolled, ExchangeFiles, Load};
use serde_json::{json, Value};

struct Args {
    bench: bool,
    config: Option<PathBuf>,
    agents: usize,
    load: Load,
    enroll_dir: Option<PathBuf>,
    exchange_pid: Option<u32>,
    dashboard: Option<String>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    requests: usize,
    runs: usize,
    dir: Option<PathBuf>,
    keep: bool,
}

const USAGE: &str = "usage: fleet-load [bench] --config EXCHANGE_TOML (not with bench) --agents N --streams M --rate LINES_PER_SEC_TOTAL --seconds S [--batch LINES] [--line-bytes B] [--enroll-dir DIR] [--exchange-pid PID] [--dashboard https://HOST:PORT --user NAME --password-file F] [--requests N] [--endpoints K] [--connect-parallel P] [--drain SECS] [--runs N --dir DIR --keep (bench)]";

fn parse() -> Result<Args> {
    let mut a = Args {
        bench: false,
        config: None,
        agents: 100,
        load: Load {
            streams: 3,
            rate: 30_000.0,
            seconds: 30.0,
            batch: 0,
            line_bytes: 256,
            endpoints: 4,
            connect_parallel: 32,
            connect_timeout: Duration::from_secs(300),
            drain: Duration::from_secs(20),
            heartbeat: fleet::HEARTBEAT,
        },
        enroll_dir: None,
        exchange_pid: None,
        dashboard: None,
        user: None,
        password_file: None,
        requests: 100,
        runs: 3,
        dir: None,
        keep: false,
    };
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("bench") {
        a.bench = true;
        args.next();
    }
    while let Some(flag) = args.next() {
        if flag == "--keep" {
            a.keep = true;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let v = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| -> Result<f64> {
            v.replace('_', "")
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .with_context(|| format!("{flag} {v:?} is not a number"))
        };
        match flag.as_str() {
            "--config" => a.config = Some(v.into()),
            "--agents" => a.agents = num(&v)? as usize,
            "--streams" => a.load.streams = num(&v)? as usize,
            "--rate" => a.load.rate = num(&v)?,
            "--seconds" => a.load.seconds = num(&v)?,
            "--batch" => a.load.batch = num(&v)? as u32,
            "--line-bytes" => a.load.line_bytes = num(&v)? as usize,
            "--endpoints" => a.load.endpoints = num(&v)? as usize,
            "--connect-parallel" => a.load.connect_parallel = num(&v)? as usize,
            "--drain" => a.load.drain = Duration::from_secs_f64(num(&v)?),
            "--enroll-dir" => a.enroll_dir = Some(v.into()),
            "--exchange-pid" => a.exchange_pid = Some(num(&v)? as u32),
            "--dashboard" => a.dashboard = Some(v.trim_end_matches('/').to_string()),
            "--user" => a.user = Some(v),
            "--password-file" => a.password_file = Some(v.into()),
            "--requests" => a.requests = num(&v)? as usize,
            "--runs" => a.runs = (num(&v)? as usize).max(1),
            "--dir" => a.dir = Some(v.into()),
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if a.agents == 0 || a.load.streams == 0 || a.load.rate <= 0.0 || a.load.seconds <= 0.0 {
        bail!("--agents, --streams, --rate and --seconds must be positive\n{USAGE}");
    }
    if a.load.line_bytes < 16 {
        bail!("--line-bytes must be at least 16");
    }
    if a.load.batch == 0 {
        // One batch per stream per second, as a tail agent commits a trickle.
        let per_stream = a.load.rate / (a.agents * a.load.streams) as f64;
        a.load.batch = (per_stream.round() as u32).clamp(1, 4000);
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse()?;
    let nofile = fleet::raise_nofile();
    eprintln!("fleet-load: open files limit {nofile}");
    if args.bench {
        return bench(&args);
    }
    let config = args
        .config
        .as_ref()
        .with_context(|| format!("--config is required\n{USAGE}"))?;
    let files = fleet::read_exchange(config)?;
    let pid = match args.exchange_pid {
        Some(p) => Some(p),
        None => find_exchange(config),
    };
    if pid.is_none() {
        eprintln!("fleet-load: no running `ferry-exchange serve --config {}` found; RSS not sampled (pass --exchange-pid)", config.display());
    }
    let dashboard = dashboard_login(&args, &files)?;
    let enroll_dir = args.enroll_dir.clone().unwrap_or_else(|| {
        config
            .parent()
            .unwrap_or(Path::new("."))
            .join("fleet-agents")
    });
    let t = Instant::now();
    let agents = fleet::enroll_fleet(&files, &enroll_dir, args.agents)?;
    eprintln!(
        "fleet-load: {} agents enrolled in {} ({:.1}s)",
        agents.len(),
        enroll_dir.display(),
        t.elapsed().as_secs_f64()
    );
    let summary = measure(&args, &files, pid, dashboard, agents)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn dashboard_login(args: &Args, files: &ExchangeFiles) -> Result<Option<Login>> {
    let base = match (&args.dashboard, &files.dashboard) {
        (Some(b), _) => b.clone(),
        (None, Some(listen)) => format!("https://{}", listen.replace("0.0.0.0", "127.0.0.1")),
        (None, None) => return Ok(None),
    };
    let (Some(user), Some(pw)) = (&args.user, &args.password_file) else {
        eprintln!("fleet-load: no --user/--password-file: the dashboard is not measured");
        return Ok(None);
    };
    let password = std::fs::read_to_string(pw)
        .with_context(|| format!("reading {}", pw.display()))?
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    Ok(Some(Login {
        base,
        ca: files.ca.clone(),
        user: user.clone(),
        password,
    }))
}

/// A running `ferry-exchange serve --config CONFIG`: scans /proc.
fn find_exchange(config: &Path) -> Option<u32> {
    let want = std::fs::canonicalize(config).ok()?;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !argv.first().is_some_and(|a| a.ends_with("ferry-exchange"))
            || !argv.iter().any(|a| a == "serve")
        {
            continue;
        }
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        if argv
            .iter()
            .any(|a| std::fs::canonicalize(cwd.join(a)).is_ok_and(|p| p == want))
        {
            return Some(pid);
        }
    }
    None
}

fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Runs the fleet against the exchange and measures it; the run's summary.
fn measure(
    args: &Args,
    files: &ExchangeFiles,
    pid: Option<u32>,
    login: Option<Login>,
    agents: Vec<Enrolled>,
) -> Result<Value> {
    let n = agents.len();
    let load = args.load.clone();
    let mib = |p: Option<u32>| {
        p.and_then(|p| proc_kib(p, "VmRSS:"))
            .map(|k| round1(k as f64 / 1024.0))
    };
    let rss_before_connect = mib(pid);
    let counters = Arc::new(Counters::default());
    let (tx, rx) = tokio::sync::watch::channel(None);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let addr = files.listen;
    let c = counters.clone();
    let l = load.clone();
    let fleet_thread = std::thread::spawn(move || rt.block_on(fleet::run(agents, addr, l, c, tx)));
    let connect_started = Instant::now();
    let t0 = loop {
        if let Some(t0) = *rx.borrow() {
            break t0.into_std();
        }
        if fleet_thread.is_finished() {
            break Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let connected_at_start = counters.connected.load(Ordering::Relaxed);
    eprintln!(
        "fleet-load: {connected_at_start}/{n} agents connected in {connect_secs:.1}s; load {} lines/s for {}s in batches of {}",
        load.rate, load.seconds, load.batch
    );
    let end = t0 + Duration::from_secs_f64(load.seconds);
    // The dashboard is timed once the load is steady.
    let warmup = Duration::from_secs_f64((load.seconds / 4.0).min(10.0));
    let requests = args.requests;
    let prober = login.map(|login| {
        std::thread::spawn(move || {
            std::thread::sleep((t0 + warmup).saturating_duration_since(Instant::now()));
            probe(&login, requests, end)
        })
    });
    std::thread::sleep(t0.saturating_duration_since(Instant::now()));
    let rss_connected = mib(pid);
    let acked0 = counters.records_acked.load(Ordering::Relaxed);
    let cpu0 = pid.map(cpu_secs);
    let me = std::process::id();
    let my_cpu0 = cpu_secs(me);
    let mut rss = Vec::new();
    // Records/s in the steady part of the window: from the warm-up's end (the
    // first batches of each stream are then acknowledged) to the window's end.
    let mut steady: Option<(Instant, u64)> = None;
    while Instant::now() < end {
        if steady.is_none() && Instant::now() >= t0 + warmup {
            steady = Some((
                Instant::now(),
                counters.records_acked.load(Ordering::Relaxed),
            ));
        }
        if let Some(k) = pid.and_then(|p| proc_kib(p, "VmRSS:")) {
            rss.push(k as f64 / 1024.0);
        }
        std::thread::sleep(
            Duration::from_millis(250).min(end.saturating_duration_since(Instant::now())),
        );
    }
    let acked1 = counters.records_acked.load(Ordering::Relaxed);
    let window = t0.elapsed().as_secs_f64().max(1e-3);
    let steady_rate =
        steady.map(|(at, a)| ((acked1 - a) as f64 / at.elapsed().as_secs_f64().max(1e-3)).round());
    let cpu = match (pid, cpu0) {
        (Some(p), Some(c0)) => Some(round1((cpu_secs(p) - c0) / window * 100.0)),
        _ => None,
    };
    let my_cpu = round1((cpu_secs(me) - my_cpu0) / window * 100.0);
    let online_at_end = counters.online.load(Ordering::Relaxed);
    let hwm = pid.and_then(|p| proc_kib(p, "VmHWM:"));
    let fleet_result = fleet_thread
        .join()
        .map_err(|_| anyhow!("the fleet's thread panicked"))?;
    if let Err(e) = fleet_result {
        bail!("the fleet failed: {e:#}");
    }
    let timings = match prober {
        Some(p) => Some(
            p.join()
                .map_err(|_| anyhow!("the dashboard probe panicked"))??,
        ),
        None => None,
    };
    let dash = timings.map(|t| {
        let stats = |v: &[f64]| json!({"n": v.len(), "p50_ms": round1(pct(v, 50.0)), "p99_ms": round1(pct(v, 99.0)), "max_ms": round1(pct(v, 100.0))});
        json!({
            "overview_api": stats(&t.overview),
            "agents_api": stats(&t.agents),
            "overview_page": stats(&t.page),
            "rounds_ending_after_the_load": t.after_load,
            "last_overview": {"agents": t.last_overview["agents"], "counts": t.last_overview["counts"], "districts": t.last_overview["districts"].as_array().map_or(0, Vec::len)},
        })
    });
    let c = &counters;
    Ok(json!({
        "agents": n,
        "streams_per_agent": load.streams,
        "agents_connected": c.connected.load(Ordering::Relaxed),
        "agents_connected_at_load_start": connected_at_start,
        "agents_online_at_load_end": online_at_end,
        "connect_seconds": round1(connect_secs),
        "offered_records_per_s": load.rate,
        "batch_lines": load.batch,
        "line_bytes": load.line_bytes,
        "seconds": load.seconds,
        "records_acked_in_window": acked1 - acked0,
        "records_per_s": steady_rate,
        "records_per_s_whole_window": (((acked1 - acked0) as f64) / window).round(),
        "steady_from_second": warmup.as_secs_f64(),
        "records_acked_total": c.records_acked.load(Ordering::Relaxed),
        "records_sent_total": c.records_sent.load(Ordering::Relaxed),
        "batches_sent": c.batches_sent.load(Ordering::Relaxed),
        "heartbeats": c.heartbeats.load(Ordering::Relaxed),
        "errors": c.errors.load(Ordering::Relaxed),
        "reconnects": c.reconnects.load(Ordering::Relaxed),
        "error_samples": c.error_samples(),
        "exchange_pid": pid,
        "exchange_rss_mib_before_connect": rss_before_connect,
        "exchange_rss_mib_connected_idle": rss_connected,
        "exchange_rss_mib_max": rss.iter().copied().reduce(f64::max).map(round1),
        "exchange_rss_mib_median": (!rss.is_empty()).then(|| round1(pct(&rss, 50.0))),
        "exchange_peak_rss_mib": hwm.map(|k| round1(k as f64 / 1024.0)),
        "exchange_cpu_percent": cpu,
        "fleet_load_cpu_percent": my_cpu,
        "dashboard": dash,
    }))
}

/// CPU seconds (user + system) a live process used so far.
fn cpu_secs(pid: u32) -> f64 {
    ferry_tests::bench::cpu_secs(pid)
}

/// `name` beside this binary (both in `target/<profile>`).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let p = exe
        .parent()
        .context("this binary has no directory")?
        .join(name);
    if !p.is_file() {
        bail!(
            "{} is missing: build it (`cargo build --release -p ferry-exchange`)",
            p.display()
        );
    }
    Ok(p)
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A `serve` process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One run of `bench`: a fresh exchange with its dashboard and a user, serving;
/// the fleet enrolled; the load measured; the exchange stopped.
fn bench_run(args: &Args, dir: &Path) -> Result<Value> {
    let exchange = sibling("ferry-exchange")?;
    let ex = dir.join("ex");
    let port = free_port()?;
    let dash = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    run_ok(
        Command::new(&exchange)
            .args(["init", "--dir"])
            .arg(&ex)
            .args(["--listen", &format!("127.0.0.1:{port}")]),
    )?;
    let config = ex.join("exchange.toml");
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(&format!(
        "\n[dashboard]\nlisten = \"127.0.0.1:{dash}\"\n\n[limits]\nmax_connections = {}\n",
        args.agents + 64
    ));
    std::fs::write(&config, text)?;
    let pw = dir.join("password");
    std::fs::write(&pw, "fleet-load-password\n")?;
    run_ok(
        Command::new(&exchange)
            .args(["user", "add", "--config"])
            .arg(&config)
            .args(["--name", "fleet", "--role", "auditor", "--password-file"])
            .arg(&pw),
    )?;
    let files = fleet::read_exchange(&config)?;
    let agents = fleet::enroll_fleet(&files, &dir.join("agents"), args.agents)?;
    let serve = Serve(
        Command::new(&exchange)
            .args(["serve", "--config"])
            .arg(&config)
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.join("exchange.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", exchange.display()))?,
    );
    let sock = files.store_dir.join("exchange.sock");
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", dash)).is_err()
    {
        if t.elapsed() > Duration::from_secs(60) {
            bail!(
                "the exchange did not start; log in {}",
                dir.join("exchange.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let login = Login {
        base: format!("https://127.0.0.1:{dash}"),
        ca: files.ca.clone(),
        user: "fleet".into(),
        password: "fleet-load-password".into(),
    };
    let summary = measure(args, &files, Some(serve.0.id()), Some(login), agents)?;
    drop(serve);
    Ok(summary)
}

fn bench(args: &Args) -> Result<()> {
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("fleet-load-{}", std::process::id())),
    };
    let mut runs = Vec::new();
    for k in 1..=args.runs {
        let dir = base.join(format!("run-{k}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        eprintln!(
            "fleet-load: run {k}/{} in {} ({started})",
            args.runs,
            dir.display()
        );
        let mut s = bench_run(args, &dir)?;
        s["started"] = json!(started.to_string());
        println!("{s}");
        runs.push(s);
        if !args.keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let med = |f: &dyn Fn(&Value) -> Option<f64>| -> Value {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        if v.is_empty() {
            Value::Null
        } else {
            json!(round1(pct(&v, 50.0)))
        }
    };
    let dash = |what: &'static str, stat: &'static str| {
        move |r: &Value| r["dashboard"][what][stat].as_f64()
    };
    let median = json!({
        "records_per_s": med(&|r| r["records_per_s"].as_f64()),
        "agents_connected": med(&|r| r["agents_connected"].as_f64()),
        "exchange_rss_mib_connected_idle": med(&|r| r["exchange_rss_mib_connected_idle"].as_f64()),
        "exchange_rss_mib_max": med(&|r| r["exchange_rss_mib_max"].as_f64()),
        "exchange_peak_rss_mib": med(&|r| r["exchange_peak_rss_mib"].as_f64()),
        "exchange_cpu_percent": med(&|r| r["exchange_cpu_percent"].as_f64()),
        "fleet_load_cpu_percent": med(&|r| r["fleet_load_cpu_percent"].as_f64()),
        "overview_api_p50_ms": med(&dash("overview_api", "p50_ms")),
        "overview_api_p99_ms": med(&dash("overview_api", "p99_ms")),
        "agents_api_p50_ms": med(&dash("agents_api", "p50_ms")),
        "agents_api_p99_ms": med(&dash("agents_api", "p99_ms")),
        "overview_page_p50_ms": med(&dash("overview_page", "p50_ms")),
        "overview_page_p99_ms": med(&dash("overview_page", "p99_ms")),
        "errors": med(&|r| r["errors"].as_f64()),
    });
    println!("{}", json!({"runs": runs.len(), "median": median}));
    Ok(())
}
