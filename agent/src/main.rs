//! `ferry-agent`: the Ferry edge agent.

mod admin;
mod bandwidth;
mod buffer;
mod cli;
mod committer;
mod config;
mod link_doctor;
mod logfile;
mod metrics;
mod run;
mod shipper;
mod sources;
mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use ferry_adapters::human_bytes;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::cli::{Cli, Command, LogFormat};
use crate::logfile::LogFile;

/// EX_CONFIG (sysexits.h): the configuration is missing or invalid. The unit's
/// `RestartPreventExitStatus=78` keeps systemd from restarting into the same
/// error every few seconds: only an edited file can fix it.
const EX_CONFIG: u8 = 78;

/// Where `--daemon` without `--log-file` sends the log (glibc's syslog()).
const SYSLOG_SOCKET: &str = "/dev/log";

/// A configuration that `run` or `check-config` refuses: the process exits with
/// [`EX_CONFIG`]. (`status`, `doctor` and `salvage` keep exiting 1.)
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct InvalidConfig(#[from] config::ConfigError);

/// Where `run` logs.
enum LogTarget {
    /// stderr: the journal under systemd, the terminal in the foreground.
    Stderr,
    /// `--log-file`, reopened on SIGUSR1 and SIGHUP.
    File(LogFile),
    /// `--daemon` without `--log-file`: stderr is /dev/null then.
    Syslog,
}

impl LogTarget {
    /// Settled before `--daemon` detaches, so a log file that cannot be opened, or
    /// a host without syslog, is reported on the operator's terminal.
    fn choose(log_file: Option<&Path>, daemon: bool) -> Result<LogTarget> {
        match log_file {
            Some(p) => LogFile::open(p)
                .map(LogTarget::File)
                .with_context(|| format!("opening the log file (--log-file {})", p.display())),
            None if daemon => {
                if !Path::new(SYSLOG_SOCKET).exists() {
                    anyhow::bail!(
                        "--daemon without --log-file logs to syslog, but {SYSLOG_SOCKET} does not exist on this host: pass --log-file PATH"
                    );
                }
                Ok(LogTarget::Syslog)
            }
            None => Ok(LogTarget::Stderr),
        }
    }
}

fn init_logging(format: LogFormat, target: &LogTarget) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The journal, log files and syslog want plain text; colours only on a terminal.
    let (writer, ansi) = match target {
        LogTarget::Stderr => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ),
        LogTarget::File(f) => (BoxMakeWriter::new(f.clone()), false),
        LogTarget::Syslog => {
            let syslog = syslog_tracing::Syslog::new(
                c"ferry-agent",
                syslog_tracing::Options::LOG_PID,
                syslog_tracing::Facility::Daemon,
            )
            .context("opening syslog: it is already open in this process")?;
            (BoxMakeWriter::new(syslog), false)
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    ferry_transport::failpoint::setup();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            config,
            daemon,
            pid_file,
            log_file,
            log_format,
        } => cmd_run(&config, daemon, pid_file, log_file.as_deref(), log_format),
        Command::CheckConfig {
            config,
            strict,
            has_streams,
        } => match config::load(
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
                if has_streams && l.config.streams.is_empty() {
                    // Exit 1, not 78: the file is valid, there is just nothing to
                    // run yet (an ExecCondition= then skips the start quietly).
                    eprintln!(
                        "ferry-agent: {} declares no [[stream]]: nothing to ship yet. Add one (see the examples in the file), then start the agent",
                        config.display()
                    );
                    return ExitCode::FAILURE;
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
            Err(e) => Err(InvalidConfig(e).into()),
        },
        Command::Status { config, json } => return cmd_status(&config, json),
        Command::Reload { config } => return cmd_reload(&config),
        Command::Doctor { config } => return cmd_doctor(&config),
        Command::Salvage { config, json } => cmd_salvage(&config, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-agent: {e:#}");
            if e.is::<InvalidConfig>() {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn cmd_run(
    path: &Path,
    daemon: bool,
    pid_file: Option<PathBuf>,
    log_file: Option<&Path>,
    log: LogFormat,
) -> Result<()> {
    // Configuration errors are reported before detaching, on the operator's terminal.
    let loaded = config::load(path, config::Host::Required).map_err(InvalidConfig)?;
    bandwidth::read_local_offset();
    let target = LogTarget::choose(log_file, daemon)?;
    if daemon {
        let mut d = daemonize::Daemonize::new().working_directory("/");
        if let Some(p) = pid_file {
            d = d.pid_file(p);
        }
        d.start().context("daemonizing")?;
    }
    init_logging(log, &target)?;
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
        if let LogTarget::File(f) = target {
            tokio::spawn(reopen_on_signals(f)?);
        }
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(reload_on_sighup(reload_tx.clone())?);
        run::run(path.to_path_buf(), loaded, shutdown, reload_rx, reload_tx).await
    })
}

/// SIGHUP reads the configuration again (as `ferry-agent reload` does; the
/// outcome is in the log). Installed before the agent runs, so an early signal
/// cannot take the default action and end the process.
fn reload_on_sighup(
    reloads: tokio::sync::mpsc::Sender<run::Reload>,
) -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    Ok(async move {
        while hup.recv().await.is_some() {
            info!("SIGHUP: reading the configuration again");
            if reloads.send(run::Reload { reply: None }).await.is_err() {
                return;
            }
        }
    })
}

/// A one-thread runtime for a command that talks to the agent or a database;
/// `None` (said on stderr) when the system cannot start one.
fn small_runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| eprintln!("ferry-agent: {e}"))
        .ok()
}

/// `reload`: exit 0 when the running agent took the file, 78 when the file (or
/// the agent) refused it, 3 when no agent runs.
fn cmd_reload(path: &Path) -> ExitCode {
    let loaded = match config::load(path, config::Host::Required) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ferry-agent: {e}");
            eprintln!("ferry-agent: not reloaded; the running configuration stays");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let socket = loaded.config.admin_socket();
    let Some(rt) = small_runtime() else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(admin::reload(&socket)) {
        Ok(admin::ReloadAnswer::Reloaded(changes)) => {
            println!("{}: reloaded ({changes})", path.display());
            ExitCode::SUCCESS
        }
        Ok(admin::ReloadAnswer::Refused(e)) => {
            eprintln!(
                "ferry-agent: the running agent refused {}: {e}",
                path.display()
            );
            eprintln!("ferry-agent: not reloaded; the running configuration stays");
            ExitCode::from(EX_CONFIG)
        }
        Err(e) => {
            eprintln!(
                "ferry-agent: agent {} is not running: {e:#}",
                loaded.config.agent.id
            );
            ExitCode::from(3)
        }
    }
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

/// With `--log-file`: reopens the file on every SIGUSR1 and SIGHUP (logrotate's
/// `postrotate` sends SIGUSR1; SIGHUP also reloads the configuration).
/// The handlers are installed before the agent runs, so an early signal cannot
/// take the default action and end the process.
fn reopen_on_signals(log: LogFile) -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1()).context("handling SIGUSR1")?;
    let mut hup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    Ok(async move {
        loop {
            let which = tokio::select! {
                Some(()) = usr1.recv() => "SIGUSR1",
                Some(()) = hup.recv() => "SIGHUP",
                else => return,
            };
            // Said after the swap, so the line is the new file's first.
            match log.reopen() {
                Ok(()) => info!(signal = which, path = %log.path().display(), "log file reopened"),
                Err(e) => warn!(
                    signal = which,
                    path = %log.path().display(),
                    error = %e,
                    "cannot reopen the log file; still writing to the old one"
                ),
            }
        }
    })
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
    let Some(rt) = small_runtime() else {
        return ExitCode::FAILURE;
    };
    let mut print = |prefix: &str, c: ferry_adapters::DoctorCheck| {
        let status = if c.ok { "ok  " } else { "FAIL" };
        if c.detail.is_empty() {
            println!("{status}  {prefix}{}", c.name);
        } else {
            println!("{status}  {prefix}{}: {}", c.name, c.detail);
        }
        if let Some(fix) = c.fix.filter(|_| !c.ok) {
            println!("      fix: {fix}");
        }
        failures += usize::from(!c.ok);
    };
    // The link to the exchange: certificates, DNS, QUIC over UDP, TLS over TCP.
    for c in rt.block_on(link_doctor::checks(&loaded.config)) {
        print("", c);
    }
    // Each kind's own checks (`KindConfig::doctor`): a database source's settings
    // and grants, the host's folders and files for the others.
    for s in &loaded.config.streams {
        for c in rt.block_on(s.source().doctor()) {
            print(&format!("stream {}: ", s.name()), c);
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
    let Some(rt) = small_runtime() else {
        return ExitCode::FAILURE;
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
    let bw = &report.bandwidth;
    println!(
        "bandwidth: {} ({}), {} sent under it, held back {:.1} s",
        bw.cap_bytes_per_second
            .map_or("no cap".to_string(), |c| format!(
                "cap {}/s",
                human_bytes(c)
            )),
        if bw.rule.is_empty() {
            "limit"
        } else {
            &bw.rule
        },
        human_bytes(bw.sent_bytes),
        bw.held_back_seconds
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
