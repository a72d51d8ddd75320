//! Source kinds: everything the agent knows of a kind of source goes through two
//! traits, and each kind is registered by one line of [`register!`] below.
//!
//! * [`SourceKind`]: the kind itself, one `static` value per kind, listed in
//!   [`KINDS`]: its name (the `kind` key, `status`, the metrics' `kind` label), how
//!   its stored positions read, and the gauges (names, help, values) its positions
//!   hold.
//! * [`KindConfig`]: the kind's `source = { kind = ..., ... }` table, parsed:
//!   validation, the checks of the host (`check-config`), `doctor`, and building
//!   the running [`Source`].
//!
//! [`SourceConfig`] (the serde enum, one variant per kind) reaches a kind's
//! [`KindConfig`] through [`SourceConfig::settings`], the one `match` over it; the
//! agent and the rest of this crate call only the traits and never name a kind.
//!
//! Adding a kind: a folder `src/<kind>/` (and `src/<kind>.rs`) with its config type
//! implementing [`KindConfig`] and a unit struct implementing [`SourceKind`], one
//! line in [`register!`], a `[[stream]]` example in `packaging/agent.toml` and the
//! README, and tests next to it.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

use serde::Deserialize;

use crate::{directory, mysql, postgres, tail, Source};

/// Figures a source's position holds, for metrics: `(name, value)`, the name one
/// of its kind's [`SourceKind::gauges`].
pub type Gauges = Vec<(&'static str, u64)>;

/// A gauge a kind can report: its name (the metric is `ferry_<name>`, so start it
/// with the kind's name) and its help text.
pub type GaugeDef = (&'static str, &'static str);

/// A kind of source, as the agent sees it whatever the configuration.
pub trait SourceKind: Sync {
    /// The `kind` value of `source = { kind = ... }`; also shown by `status` and as
    /// the metrics' `kind` label. Never change a released one.
    fn name(&self) -> &'static str;

    /// A one-line, human-readable rendering of a stored position, for `status`.
    /// Never fails: an unreadable position is described as such.
    fn describe_position(&self, position: &[u8]) -> String;

    /// Every gauge [`Self::position_gauges`] may report, with its help text.
    fn gauges(&self) -> &'static [GaugeDef] {
        &[]
    }

    /// The figures of a stored position, for metrics; names from [`Self::gauges`].
    fn position_gauges(&self, _position: &[u8]) -> Gauges {
        Vec::new()
    }
}

/// One check of `ferry-agent doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorCheck {
    pub name: String,
    pub ok: bool,
    /// What was found; may be empty when `ok`.
    pub detail: String,
    /// What to run or change when `ok` is false.
    pub fix: Option<String>,
}

pub type DoctorFuture<'a> = Pin<Box<dyn Future<Output = Vec<DoctorCheck>> + Send + 'a>>;

/// The `source = { ... }` table of one kind, parsed.
pub trait KindConfig: Debug + Send + Sync {
    /// The kind this configures.
    fn kind(&self) -> &'static dyn SourceKind;

    /// Checks what can be checked without running (paths, patterns), on any
    /// machine. The message names the offending key (`source.path: ...`).
    fn validate(&self) -> Result<(), String>;

    /// Checks what this host must provide (folders, password files). Kept apart
    /// from [`Self::validate`] so a configuration can be checked on another machine.
    fn check_environment(&self) -> Result<(), String> {
        Ok(())
    }

    /// `ferry-agent doctor`: the kind's own health check, also of what it reads
    /// (a database's settings). Never fails itself; each problem is a failed check
    /// with, where known, its fix. By default: [`Self::check_environment`] as one
    /// check named `<kind> source`.
    fn doctor(&self) -> DoctorFuture<'_> {
        let check = match self.check_environment() {
            Ok(()) => DoctorCheck {
                name: format!("{} source", self.kind().name()),
                ok: true,
                detail: String::new(),
                fix: None,
            },
            Err(e) => DoctorCheck {
                name: format!("{} source", self.kind().name()),
                ok: false,
                detail: e,
                fix: None,
            },
        };
        Box::pin(std::future::ready(vec![check]))
    }

    /// The source, ready to [`Source::run`] (again after each failure).
    fn build(&self) -> Box<dyn Source>;
}

/// Registers the kinds: one line each, `Variant(ConfigType) => KIND_VALUE`. The
/// variant's lowercase name is the `kind` key (a test holds it equal to
/// [`SourceKind::name`]).
macro_rules! register {
    ($($(#[$doc:meta])* $variant:ident($config:ty) => $kind:expr,)+) => {
        /// The `source = { kind = ..., ... }` table of a `[[stream]]`.
        #[derive(Debug, Clone, Deserialize, PartialEq)]
        #[serde(tag = "kind", rename_all = "lowercase")]
        pub enum SourceConfig {
            $($(#[$doc])* $variant($config),)+
        }

        impl SourceConfig {
            /// The kind's own configuration, through which everything dispatches.
            pub fn settings(&self) -> &dyn KindConfig {
                match self {
                    $(SourceConfig::$variant(c) => c,)+
                }
            }
        }

        /// Every kind, in registration order.
        pub static KINDS: &[&dyn SourceKind] = &[$(&$kind),+];
    };
}

register! {
    /// Files dropped into an outbox folder, shipped whole.
    Directory(directory::DirectoryConfig) => directory::Directory,
    /// Lines of a log file, across rotations.
    Tail(tail::TailConfig) => tail::Tail,
    /// Row changes of PostgreSQL tables, by logical replication.
    Postgres(postgres::PostgresConfig) => postgres::Postgres,
    /// Row changes of MySQL/MariaDB tables, from the binary log.
    Mysql(mysql::MysqlConfig) => mysql::Mysql,
}

impl SourceConfig {
    /// The kind of this source.
    pub fn source_kind(&self) -> &'static dyn SourceKind {
        self.settings().kind()
    }

    /// The kind's name (`"directory"`, ...).
    pub fn kind(&self) -> &'static str {
        self.source_kind().name()
    }

    /// See [`KindConfig::validate`].
    pub fn validate(&self) -> Result<(), String> {
        self.settings().validate()
    }

    /// See [`KindConfig::check_environment`].
    pub fn check_environment(&self) -> Result<(), String> {
        self.settings().check_environment()
    }

    /// See [`KindConfig::doctor`].
    pub fn doctor(&self) -> DoctorFuture<'_> {
        self.settings().doctor()
    }

    /// See [`KindConfig::build`].
    pub fn build(&self) -> Box<dyn Source> {
        self.settings().build()
    }

    /// See [`SourceKind::describe_position`].
    pub fn describe_position(&self, position: &[u8]) -> String {
        self.source_kind().describe_position(position)
    }

    /// See [`SourceKind::position_gauges`].
    pub fn position_gauges(&self, position: &[u8]) -> Gauges {
        self.source_kind().position_gauges(position)
    }
}

/// Every gauge any kind can report, with its help text, kind by kind.
pub fn all_gauges() -> impl Iterator<Item = GaugeDef> {
    KINDS.iter().flat_map(|k| k.gauges().iter().copied())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Each registered kind's name is the `kind` key its configuration is read
    /// under (serde's lowercase variant name), and names are unique.
    #[test]
    fn every_kind_is_configured_under_its_own_name() {
        let mut names = std::collections::HashSet::new();
        for k in KINDS {
            assert!(names.insert(k.name()), "{} registered twice", k.name());
            let e = serde_json::from_value::<SourceConfig>(serde_json::json!({ "kind": k.name() }))
                .unwrap_err()
                .to_string();
            // Known kind: what fails is a missing key of its table, not the tag.
            assert!(e.contains("missing field"), "{}: {e}", k.name());
        }
        let e = serde_json::from_value::<SourceConfig>(serde_json::json!({ "kind": "nope" }))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant"), "{e}");
    }

    /// A configuration dispatches to its own kind.
    #[test]
    fn a_configuration_reaches_its_kind() {
        for (json, kind) in [
            (
                serde_json::json!({"kind": "directory", "path": "/srv/outbox"}),
                "directory",
            ),
            (
                serde_json::json!({"kind": "tail", "path": "/var/log/app.log"}),
                "tail",
            ),
            (
                serde_json::json!({"kind": "postgres", "dsn": "host=127.0.0.1 user=u dbname=d",
                    "tables": ["public.t"], "slot": "s", "publication": "p"}),
                "postgres",
            ),
        ] {
            let c: SourceConfig = serde_json::from_value(json).unwrap();
            assert_eq!(c.kind(), kind);
            assert_eq!(c.settings().kind().name(), kind);
        }
    }

    /// Gauge names are unique, start with their kind's name (they become
    /// `ferry_<name>` metrics), and the ones the agent's metrics always had are
    /// still there.
    #[test]
    fn gauges_are_named_after_their_kind() {
        let mut seen = std::collections::HashSet::new();
        for k in KINDS {
            for (name, help) in k.gauges() {
                assert!(seen.insert(*name), "{name} twice");
                assert!(name.starts_with(&format!("{}_", k.name())), "{name}");
                assert!(!help.is_empty());
            }
        }
        for name in [
            "postgres_retained_wal_bytes",
            "postgres_durable_lsn",
            "postgres_snapshot_rows_done",
            "postgres_snapshot_rows_estimate",
        ] {
            assert!(all_gauges().any(|(n, _)| n == name), "{name}");
        }
    }
}
