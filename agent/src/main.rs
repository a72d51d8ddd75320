//! `ferry-agent`: the Ferry edge agent.

mod admin;
mod buffer;
mod committer;
mod config;
mod metrics;
mod run;
mod shipper;
mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "Ferry edge agent: captures department data and ships it to the exchange"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (as a systemd service, in the foreground, or with --daemon).
    Run {
        #[arg(long, default_value = "/etc/ferry/agent.toml")]
        config: PathBuf,
        /// Detach and run in the background (for systems without systemd).
        #[arg(long)]
        daemon: bool,
        /// With --daemon: where to write the pid.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate the configuration; errors name file:line:column. Missing
    /// certificate files or source folders on this host are warnings (errors with
    /// --strict), so a configuration can be checked before it is deployed.
    CheckConfig {
        #[arg(long, default_value = "/etc/ferry/agent.toml")]
        config: PathBuf,
        /// Treat what this host lacks (certificates, folders) as errors.
        #[arg(long)]
        strict: bool,
    },
    /// Check what the configured sources need on this host and on the databases
    /// they read (for PostgreSQL: wal_level, slots, privileges, publication, replica
    /// identity), printing the exact fix for each problem.
    Doctor {
        #[arg(long, default_value = "/etc/ferry/agent.toml")]
        config: PathBuf,
    },
    /// Recover a buffer the agent refuses to open as damaged: intact batches go to
    /// a fresh buffer, every damaged seq range is reported by stream (and shown by
    /// the exchange as a gap), the damaged buffer is kept beside it. The agent must
    /// be stopped.
    Salvage {
        #[arg(long, default_value = "/etc/ferry/agent.toml")]
        config: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Per stream: source position, buffered batches/bytes, acked seq, connection.
    Status {
        #[arg(long, default_value = "/etc/ferry/agent.toml")]
        config: PathBuf,
        /// Print the raw JSON report.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // The journal and log files want plain text; colours only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    ferry_transport::failpoint::setup();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            config,
            daemon,
            pid_file,
            log_format,
        } => cmd_run(&config, daemon, pid_file, log_format),
        Command::CheckConfig { config, strict } => match config::load(
            &config,
            if strict {
                config::Host::Required
            } else {
                config::Host::Advisory
            },
        ) {
            Ok(l) => {
                for w in &l.warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "{}: OK (agent {}, {} stream{})",
                    config.display(),
                    l.config.agent.id,
                    l.config.streams.len(),
                    if l.config.streams.len() == 1 { "" } else { "s" }
                );
                Ok(())
            }
            Err(e) => Err(anyhow::Error::new(e)),
        },
        Command::Status { config, json } => return cmd_status(&config, json),
        Command::Doctor { config } => return cmd_doctor(&config),
        Command::Salvage { config, json } => cmd_salvage(&config, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_run(path: &Path, daemon: bool, pid_file: Option<PathBuf>, log: LogFormat) -> Result<()> {
    // Configuration errors are reported before detaching, on the operator's terminal.
    let loaded = config::load(path, config::Host::Required)?;
    if daemon {
        let mut d = daemonize::Daemonize::new().working_directory("/");
        if let Some(p) = pid_file {
            d = d.pid_file(p);
        }
        d.start().context("daemonizing")?;
    }
    init_logging(log);
    bound_allocator();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signals.cancel();
        });
        run::run(loaded, shutdown).await
    })
}

/// Keeps the allocator from hoarding memory the agent no longer uses.
///
/// Batches of file chunks are megabyte buffers allocated on one blocking thread and
/// freed on another. glibc's defaults turn that into resident memory that is never
/// returned: its mmap threshold rises to the largest block freed (so 1 MiB buffers
/// move into the heap arenas, where they fragment), and every thread may get an
/// arena of its own. Measured: peak RSS shipping 512 MiB of files fell from 339 MiB
/// to the figure in BENCHMARKS.md with a fixed threshold and two arenas.
fn bound_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tunables; it is called before the
        // runtime starts any thread, and a refused setting is harmless.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Exit 0 when every check passes, 1 otherwise.
fn cmd_doctor(path: &Path) -> ExitCode {
    let loaded = match config::load(path, config::Host::Advisory) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ferry-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failures = loaded.warnings.len();
    for w in &loaded.warnings {
        println!("FAIL  {w}");
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    for s in &loaded.config.streams {
        match s.source() {
            ferry_adapters::SourceConfig::Postgres(pg) => {
                for c in rt.block_on(ferry_adapters::postgres::doctor(pg)) {
                    println!(
                        "{}  stream {}: {}: {}",
                        if c.ok { "ok  " } else { "FAIL" },
                        s.name(),
                        c.name,
                        c.detail
                    );
                    if let Some(fix) = c.fix.filter(|_| !c.ok) {
                        println!("      fix: {fix}");
                    }
                    failures += usize::from(!c.ok);
                }
            }
            other => println!(
                "{}  stream {}: {} source",
                if other.check_environment().is_ok() {
                    "ok  "
                } else {
                    "FAIL"
                },
                s.name(),
                other.kind()
            ),
        }
    }
    if failures == 0 {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("{failures} problem(s) found");
        ExitCode::FAILURE
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Exit codes follow `systemctl status`: 0 running, 3 not running, 1 error.
fn cmd_salvage(path: &Path, json: bool) -> Result<()> {
    let loaded = config::load(path, config::Host::Advisory)?;
    let cfg = &loaded.config;
    let socket = cfg.admin_socket();
    let running = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()
        .and_then(|rt| rt.block_on(admin::query(&socket)).ok());
    if let Some(r) = running {
        anyhow::bail!(
            "agent {} is running (pid {}): stop it before salvaging its buffer",
            cfg.agent.id,
            r.pid
        );
    }
    let dir = cfg.buffer_dir();
    let report = buffer::salvage(&dir, cfg.buffer.cache_size.0)
        .with_context(|| format!("salvaging the buffer at {}", dir.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for s in &report.streams {
        println!(
            "stream {}: acked {}, head {}; recovered {} batches ({} records)",
            s.name, s.acked, s.head, s.intact_batches, s.intact_records
        );
        for (a, b) in &s.lost {
            println!(
                "  LOST: seqs {a}..={b} ({} records) were durable but are damaged beyond recovery; the exchange will show them as a gap",
                b - a + 1
            );
        }
    }
    println!(
        "buffer recovered at {}; the damaged one is kept at {}",
        dir.display(),
        report.damaged_dir.display()
    );
    if report.lost_records() > 0 {
        println!(
            "{} records could not be recovered (see LOST above)",
            report.lost_records()
        );
    }
    Ok(())
}

fn cmd_status(path: &Path, json: bool) -> ExitCode {
    let loaded = match config::load(path, config::Host::Advisory) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ferry-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = loaded.config.admin_socket();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match rt.block_on(admin::query(&socket)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "ferry-agent: agent {} is not running: {e:#}",
                loaded.config.agent.id
            );
            return ExitCode::from(3);
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("ferry-agent: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    let c = &report.connection;
    println!(
        "agent {} (pid {}, version {}), up {}s",
        report.agent_id,
        report.pid,
        report.version,
        status::now_unix().saturating_sub(report.started_unix)
    );
    println!(
        "exchange {}: {}{}{}{}",
        c.exchange,
        c.state,
        if c.transport.is_empty() {
            String::new()
        } else {
            format!(" over {}", c.transport)
        },
        if c.attempts > 1 {
            format!(" (attempt {})", c.attempts)
        } else {
            String::new()
        },
        c.last_error
            .as_ref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    );
    println!(
        "buffer: {} of {}{}{}{}",
        human_bytes(report.buffer.bytes),
        human_bytes(report.buffer.max_bytes),
        if report.buffer.full {
            "  ALARM: FULL, sources paused"
        } else {
            ""
        },
        if report.buffer.disk_low {
            "  ALARM: DISK NEARLY FULL (below [buffer] min_free), sources paused"
        } else {
            ""
        },
        report
            .buffer
            .write_error
            .as_ref()
            .map(|e| format!("  ALARM: write failing: {e}"))
            .unwrap_or_default()
    );
    if let Some(alarm) = status::cert_alarm(report.cert_not_after_unix, status::now_unix()) {
        println!("certificate: {alarm}");
    }
    for s in &report.streams {
        println!(
            "stream {} ({}, {}, catalog {}): head {} acked {} buffered {} batches / {}; position: {}",
            s.name,
            s.kind,
            s.sharing,
            s.catalog_id,
            s.head_seq,
            s.acked_seq,
            s.buffered_batches,
            human_bytes(s.buffered_bytes),
            s.position
        );
        if let Some(e) = &s.source_error {
            println!("  source error: {e}");
        }
        if let Some(e) = &s.ship_error {
            println!("  shipping: {e}");
        }
        for [a, b] in &s.lost {
            println!("  LOST to buffer damage (salvaged): seqs {a}..={b}");
        }
    }
    ExitCode::SUCCESS
}
