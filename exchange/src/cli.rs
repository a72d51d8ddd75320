//! `ferry-exchange`'s command line: the clap definitions alone (only clap and
//! std), so that `packaging/gen` (`ferry-gen-docs`) can include this file and
//! write the man page and shell completions from the same definitions the
//! daemon parses.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Where the packaged unit (`systemd/ferry-exchange.service`) and `init` without
/// `--dir` keep the configuration.
pub const SYSTEM_CONFIG_DIR: &str = "/etc/ferry";
pub const SYSTEM_CONFIG: &str = "/etc/ferry/exchange.toml";

#[derive(Parser)]
#[command(
    name = "ferry-exchange",
    version,
    about = "Ferry exchange: receives, deduplicates and durably stores what agents ship"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create a CA, the exchange's server certificate and DIR/exchange.toml. An
    /// exchange.toml already in DIR (the packages install one) is kept: the CA
    /// and certificate go where its [tls] says, and --listen and --store-dir
    /// are not applied.
    Init {
        #[arg(long, default_value = SYSTEM_CONFIG_DIR)]
        dir: PathBuf,
        /// The embedded store's directory, written into exchange.toml (a relative
        /// one is relative to DIR). Default: /var/lib/ferry-exchange (the unit's
        /// StateDirectory) with --dir /etc/ferry, DIR/store with any other --dir.
        #[arg(long)]
        store_dir: Option<PathBuf>,
        /// DNS name or IP address agents use to reach the exchange (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: String,
    },
    /// Run the exchange.
    Serve {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration as `serve` would, without serving: errors
    /// name file:line:column, and the TLS files it names (CA, certificate, key,
    /// revocation list) must load. Exit 78 when it would be refused.
    CheckConfig {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
    },
    /// Have the running exchange read its configuration again (as SIGHUP and
    /// `systemctl reload ferry-exchange` do): limits, deliveries (added ones
    /// start, removed ones stop, changed ones restart from their checkpoints),
    /// alarm thresholds, TLS files and revocations take effect without a
    /// restart. The file is checked first; a refused one (errors name
    /// file:line:column; exit 78) changes nothing. Users need no reload: they
    /// live in the store.
    Reload {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
    },
    /// Issue an agent's key and certificate and write a starter DIR/agent.toml.
    Enroll {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        agent_id: String,
        #[arg(long)]
        department: String,
        #[arg(long)]
        out: PathBuf,
        /// The agent's data_dir (default: OUT/data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Issue a certificate even though the agent id has a live one (a
        /// reinstalled server); revoke the old one when it is no longer used.
        #[arg(long)]
        replace: bool,
    },
    /// Revoke an agent's certificates: the exchange refuses them from now on and
    /// closes their open connections. Prints one JSON line per certificate revoked.
    Revoke {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
        /// Revoke every certificate issued to this agent.
        #[arg(long)]
        agent_id: Option<String>,
        /// Revoke this certificate file (e.g. one issued before certificates were
        /// kept on record).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// key-compromise | superseded | cessation-of-operation | unspecified
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
    /// Print stored records of a stream in seq order, one JSON line each.
    Records {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        stream: String,
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
    /// Write the received files of a stream into a directory.
    Export {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        stream: String,
        #[arg(long)]
        to: PathBuf,
    },
    /// List the agents the exchange has seen, one JSON line each.
    Agents {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
    },
    /// Decide on a stream the exchange holds (a wiped, restored or cloned agent
    /// buffer; `agents` lists holds): accept the held buffer as the stream's
    /// continuation from the next seq (a boundary is recorded), or refuse it.
    /// Prints the stream's record as one JSON line.
    Resolve {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        stream: String,
        /// Continue the stream with the held buffer.
        #[arg(long, conflicts_with = "refuse", required_unless_present = "refuse")]
        accept: bool,
        /// Keep refusing it.
        #[arg(long)]
        refuse: bool,
        /// Why (recorded, and shown to the agent when refused).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Where each `[[delivery]]` stands: one JSON line per (delivery, agent,
    /// stream) with its checkpoint (seq), lag in records and seconds, and last error.
    Deliveries {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
    },
    /// List seq ranges of a stream that never arrived, one JSON line each.
    Gaps {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        stream: String,
    },
    /// Manage the exchange's users (add, passwd, remove, list).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Print the audit log from seq --from on, one JSON line per entry; with
    /// --verify, check its hash chain first (fails naming the first broken seq).
    Audit {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long)]
        verify: bool,
    },
}

/// `ferry-exchange user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user: prints it as one JSON line.
    Add {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        name: String,
        /// admin | operator | auditor
        #[arg(long)]
        role: String,
        /// A file whose first line is the password (at least 8 characters).
        #[arg(
            long,
            required_unless_present = "token_file",
            conflicts_with = "token_file"
        )]
        password_file: Option<PathBuf>,
        /// Make a machine user (a script, a big screen) instead: a new API
        /// token is written to this file (created, mode 0600; it must not
        /// exist) and only its SHA-256 is kept. The user sends
        /// `Authorization: Bearer TOKEN` with each dashboard API request and
        /// cannot log in with a password.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Set a user's password (and unlock the account).
    Passwd {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        password_file: PathBuf,
    },
    /// Remove a user.
    Remove {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// List the users, one JSON line each (name, role, created, locked; never
    /// the password hash).
    List {
        #[arg(long, default_value = SYSTEM_CONFIG)]
        config: PathBuf,
    },
}
