//! `ferry-exchange`: the municipal end of Ferry.

mod admin;
mod alarms;
mod audit;
mod cli;
mod config;
mod dashboard;
mod delivery;
mod enroll;
mod fleet;
mod history;
mod metrics;
mod records;
mod server;
mod store;
mod trust;
mod users;
mod watchdog;
mod webhook;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command, SYSTEM_CONFIG_DIR};

/// Where the packaged unit's `StateDirectory=` is: `init`'s store without `--dir`.
const SYSTEM_STORE_DIR: &str = "/var/lib/ferry-exchange";

/// Threads for blocking work (store reads and writes off the async threads:
/// stream plans at `Hello`, registry writes per heartbeat, dashboard reads).
/// They queue on the store's locks anyway, so more threads add only memory:
/// with tokio's default of 512, a fleet connecting at once held 512 idle
/// threads, each with its stack and allocator cache.
const BLOCKING_THREADS: usize = 32;

/// glibc gives each thread that allocates its own arena, up to 8 per core.
/// The exchange's buffers are allocated on one thread (a connection's task)
/// and freed on another (the store committer), and each arena keeps the holes
/// they leave: with 1,000 agents sending, 2 arenas held 45 MiB less than the
/// default at the same throughput (BENCHMARKS.md). `MALLOC_ARENA_MAX` in the
/// environment still decides where it is set.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before the
        // runtime starts its threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// EX_CONFIG (sysexits.h): the configuration is missing or invalid. The unit's
/// `RestartPreventExitStatus=78` keeps systemd from restarting into the same
/// error every few seconds: only an edited file can fix it.
const EX_CONFIG: u8 = 78;

/// A configuration `serve` refuses: the process exits with [`EX_CONFIG`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct InvalidConfig(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init {
            dir,
            store_dir,
            names,
            listen,
        } => {
            let store_dir = store_dir.unwrap_or_else(|| default_store_dir(&dir));
            enroll::init(&dir, &store_dir, &names, &listen)
        }
        Command::Serve { config } => serve(&config),
        Command::CheckConfig { config } => check_config(&config),
        Command::Reload { config } => reload(&config),
        Command::Enroll {
            config,
            agent_id,
            department,
            out,
            data_dir,
            replace,
        } => enroll::enroll(
            &config,
            &agent_id,
            &department,
            &out,
            data_dir.as_deref(),
            replace,
        ),
        Command::Records {
            config,
            agent,
            stream,
            from,
        } => query(
            &config,
            admin::Request::Records {
                agent,
                stream,
                from,
            },
        ),
        Command::Export {
            config,
            agent,
            stream,
            to,
        } => {
            let to = if to.is_absolute() {
                to
            } else {
                std::env::current_dir().map(|d| d.join(&to)).unwrap_or(to)
            };
            query(&config, admin::Request::Export { agent, stream, to })
        }
        Command::Agents { config } => agents(&config),
        Command::Revoke {
            config,
            agent_id,
            cert,
            reason,
        } => revoke(&config, agent_id.as_deref(), cert.as_deref(), &reason),
        Command::Deliveries { config } => query(&config, admin::Request::Deliveries),
        Command::Gaps {
            config,
            agent,
            stream,
        } => query(&config, admin::Request::Gaps { agent, stream }),
        Command::User { command } => users::cli(command),
        Command::Audit {
            config,
            from,
            verify,
        } => audit::cli(&config, from, verify),
        Command::Resolve {
            config,
            agent,
            stream,
            accept,
            refuse: _,
            reason,
        } => query(
            &config,
            admin::Request::Resolve {
                agent,
                stream,
                accept,
                reason,
            },
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-exchange: {e:#}");
            if e.is::<InvalidConfig>() {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `init`'s store when `--store-dir` is not given: the unit's state directory for
/// the system layout (/etc/ferry is read-only to the service), else beside the
/// configuration (relative, so the directory can be moved whole).
fn default_store_dir(dir: &Path) -> PathBuf {
    if dir == Path::new(SYSTEM_CONFIG_DIR) {
        PathBuf::from(SYSTEM_STORE_DIR)
    } else {
        PathBuf::from("store")
    }
}

/// `reload`: the file checked as `check-config` does, then read again by the
/// running exchange, which answers what changed (or why it refused).
fn reload(path: &Path) -> Result<()> {
    let refused = |e: String| {
        InvalidConfig(format!(
            "{e}\nnot reloaded; the running configuration stays"
        ))
    };
    let cfg = config::load(path).map_err(|e| refused(format!("{e:#}")))?;
    server::check_tls(&cfg).map_err(|e| refused(format!("{}: {e:#}", path.display())))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut out = Vec::new();
    let socket = cfg.admin_socket();
    match rt.block_on(admin::ask(&socket, &admin::Request::ReloadConfig, &mut out)) {
        Ok(Some(_)) => {
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
            println!(
                "{}: reloaded ({})",
                path.display(),
                v["reloaded"].as_str().unwrap_or("")
            );
            Ok(())
        }
        Ok(None) => anyhow::bail!(
            "no exchange answers on {}: it reads {} when it starts",
            socket.display(),
            path.display()
        ),
        Err(e) => Err(refused(format!("{e:#}")).into()),
    }
}

/// `check-config`: what `serve` checks before it binds anything.
fn check_config(path: &Path) -> Result<()> {
    let cfg = config::load(path).map_err(|e| InvalidConfig(format!("{e:#}")))?;
    server::check_tls(&cfg).map_err(|e| InvalidConfig(format!("{}: {e:#}", path.display())))?;
    println!(
        "{}: OK (listen {}, store {}, {} deliver{})",
        path.display(),
        cfg.exchange.listen,
        cfg.store.dir.display(),
        cfg.deliveries.len(),
        if cfg.deliveries.len() == 1 {
            "y"
        } else {
            "ies"
        }
    );
    Ok(())
}

fn serve(path: &Path) -> Result<()> {
    let cfg = config::load(path).map_err(|e| InvalidConfig(format!("{e:#}")))?;
    // Files the configuration names that do not load are the configuration's
    // problem too: exit 78, no restart loop.
    server::check_tls(&cfg).map_err(|e| InvalidConfig(format!("{}: {e:#}", path.display())))?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    ferry_transport::failpoint::setup();
    limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        watchdog::spawn(cfg.admin_socket(), shutdown.clone());
        let s = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            if let (Ok(mut t), Ok(mut i)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
            s.cancel();
        });
        server::serve(cfg, path.to_path_buf(), shutdown).await
    })
}

fn revoke(path: &Path, agent_id: Option<&str>, cert: Option<&Path>, reason: &str) -> Result<()> {
    if agent_id.is_none() && cert.is_none() {
        anyhow::bail!("name what to revoke: --agent-id ID and/or --cert FILE");
    }
    let reason = ferry_transport::pki::Reason::parse(reason).with_context(|| {
        format!("--reason {reason:?}: key-compromise, superseded, cessation-of-operation or unspecified")
    })?;
    let cfg = config::load(path)?;
    let revoked = trust::revoke(&cfg, agent_id, cert, reason)?;
    for r in &revoked {
        println!("{}", serde_json::to_string(r)?);
    }
    if revoked.is_empty() {
        eprintln!("nothing new to revoke: those certificates were revoked already");
    } else {
        audit::record_cli(
            &cfg,
            "revoke",
            agent_id.unwrap_or_default(),
            serde_json::json!({"serials": revoked.iter().map(|x| x.serial.clone()).collect::<Vec<_>>()}),
        );
    }
    // A running exchange takes the new list at once.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut sink = Vec::new();
    match rt.block_on(admin::ask(
        &cfg.admin_socket(),
        &admin::Request::Reload,
        &mut sink,
    ))? {
        Some(closed) => {
            eprintln!("the running exchange refuses them now; {closed} open connection(s) closed")
        }
        None => eprintln!("the exchange is not running; it refuses them when it starts"),
    }
    Ok(())
}

/// The fleet, each agent with `revoked`: whether the certificate it last
/// connected with is revoked.
fn agents(path: &Path) -> Result<()> {
    let cfg = config::load(path)?;
    let revoked: std::collections::HashSet<String> = trust::revoked(&cfg)?
        .into_iter()
        .map(|r| r.serial)
        .collect();
    let mut lines = Vec::new();
    ask_or_open(&cfg, &admin::Request::Agents, &mut lines)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in String::from_utf8_lossy(&lines).lines() {
        let mut v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("an agent record that is not JSON: {line}"))?;
        let serial = v["cert_serial"].as_str().unwrap_or_default().to_string();
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "revoked".into(),
                serde_json::json!(revoked.contains(&serial)),
            );
        }
        writeln!(out, "{v}")?;
    }
    Ok(())
}

/// Asks the running exchange; when none runs, opens the store directly.
fn query(path: &Path, req: admin::Request) -> Result<()> {
    let cfg = config::load(path)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    ask_or_open(&cfg, &req, &mut out)
}

fn ask_or_open(
    cfg: &config::ExchangeConfig,
    req: &admin::Request,
    out: &mut dyn Write,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if rt
        .block_on(admin::ask(&cfg.admin_socket(), req, out))?
        .is_some()
    {
        return Ok(());
    }
    let store = store::open(&cfg.store)
        .with_context(|| format!("opening the store in {}", cfg.store.dir.display()))?;
    admin::execute(
        &store,
        &admin::Deliveries::Offline(&cfg.deliveries),
        req,
        out,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::SYSTEM_CONFIG;

    /// `init` with no `--dir` writes the layout the unit expects; any other
    /// directory keeps its store beside the configuration.
    #[test]
    fn init_defaults_match_the_unit() {
        assert_eq!(
            default_store_dir(Path::new(SYSTEM_CONFIG_DIR)),
            Path::new("/var/lib/ferry-exchange")
        );
        assert_eq!(
            default_store_dir(Path::new("/srv/exchange")),
            Path::new("store")
        );
        let unit = include_str!("../../systemd/ferry-exchange.service");
        assert!(unit.contains(&format!("--config {SYSTEM_CONFIG}\n")));
        assert!(unit.contains("StateDirectory=ferry-exchange\n"));
    }
}
