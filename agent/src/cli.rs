//! `ferry-agent`'s command line: the clap definitions alone (only clap and std),
//! so that `packaging/gen` (`ferry-gen-docs`) can include this file and write the
//! man page and shell completions from the same definitions the daemon parses.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "Ferry edge agent: captures department data and ships it to the exchange"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Write the log to this file (appended to, created mode 0640) instead of
        /// stderr; SIGUSR1 or SIGHUP reopen it after logrotate renamed it. With
        /// --daemon and no --log-file the log goes to syslog (/dev/log).
        #[arg(long)]
        log_file: Option<PathBuf>,
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
        /// Also require at least one [[stream]]: exit 1 when there is none. The
        /// unit's ExecCondition= uses it, so a freshly installed agent (whose
        /// example streams are commented out) is not started until one is added.
        #[arg(long)]
        has_streams: bool,
    },
    /// Check the link to the exchange (certificate files and expiry, DNS, a QUIC
    /// handshake over UDP, TLS over TCP, whether the exchange accepts this agent's
    /// certificate) and what the configured sources need on this host and on the
    /// databases they read (for PostgreSQL: wal_level, slots, privileges,
    /// publication, replica identity), printing the exact fix for each problem.
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
    /// Has the running agent read its configuration again (as SIGHUP and
    /// `systemctl reload ferry-agent` do): added streams start, removed ones stop
    /// once their commits in flight settle (what they buffered still ships), the
    /// others start again from their durable positions. A file with errors is
    /// refused with its file:line:column errors (exit 78) and the running
    /// configuration stays.
    Reload {
        #[arg(long, default_value = "/etc/ferry/agent.toml")]
        config: PathBuf,
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
pub enum LogFormat {
    Text,
    Json,
}
