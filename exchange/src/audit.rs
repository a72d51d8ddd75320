//! The audit log: who did what to the exchange, append-only and hash-chained.
//!
//! # Format
//! Each entry is an [`AuditEntry`]; its `hash` is the hex SHA-256 of its
//! canonical JSON without the `hash` field:
//! ```text
//! {"action":…,"actor":…,"detail":…,"prev_hash":…,"seq":…,"target":…,"time_unix_ms":…}
//! ```
//! keys sorted at every depth (also inside `detail`), no whitespace, strings
//! escaped as `serde_json` escapes them. `prev_hash` is the previous entry's
//! `hash` (`""` for seq 1), and seqs run 1, 2, 3, … without a hole, so
//! changing, removing or inserting an entry breaks the chain at that seq
//! ([`verify_chain`]). Rewriting the tail from some seq on, hashes and all, is
//! caught only against a head kept elsewhere: `ferry-exchange audit --verify`
//! prints the head's seq and hash for the operator to note.
//!
//! # Appending
//! Backends assign seq, time and both hashes in [`crate::store::Registry::append_audit`],
//! atomically with respect to every other appender, also on other exchange
//! nodes: the embedded store under a lock, JetStream with a publish
//! conditional on the audit subject's last message (see the backends).
//!
//! Actors are `cli:UNIX_USER` for the command line and `web:USER` for the
//! dashboard's users; actions are short verbs such as `login`,
//! `login_failed`, `user_add`, `user_passwd`, `user_remove`, `user_list`,
//! `enroll`, `revoke`, `alarm_ack`.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::Registry;

/// One entry of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    pub seq: u64,
    pub time_unix_ms: u64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
    /// `hash` of the entry before (`""` for seq 1).
    pub prev_hash: String,
    /// Hex SHA-256 of this entry's canonical JSON without `hash`.
    pub hash: String,
}

impl AuditEntry {
    /// The entry following `prev` (`None`: the first), hashed.
    pub fn next(
        prev: Option<&AuditEntry>,
        time_unix_ms: u64,
        actor: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> AuditEntry {
        let mut e = AuditEntry {
            seq: prev.map_or(1, |p| p.seq + 1),
            time_unix_ms,
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail,
            prev_hash: prev.map(|p| p.hash.clone()).unwrap_or_default(),
            hash: String::new(),
        };
        e.hash = e.computed_hash();
        e
    }

    /// The hash this entry's content gives (what `hash` must be).
    pub fn computed_hash(&self) -> String {
        let body = serde_json::json!({
            "seq": self.seq,
            "time_unix_ms": self.time_unix_ms,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "detail": self.detail,
            "prev_hash": self.prev_hash,
        });
        let mut text = String::new();
        canonical(&body, &mut text);
        hex::encode(Sha256::digest(text.as_bytes()))
    }
}

/// Writes `v` as JSON with every object's keys sorted, no whitespace: the
/// same bytes whichever order a map was built or parsed in.
fn canonical(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(x) = m.get(k) {
                    canonical(x, out);
                }
            }
            out.push('}');
        }
        serde_json::Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Checks a run of consecutive entries: each one's hash matches its content,
/// seqs follow each other, and each names the one before by its hash (the
/// first of the run too when it is seq 1). The error names the first seq at
/// which the chain is broken, and how.
pub fn verify_chain(entries: &[AuditEntry]) -> Result<(), String> {
    let mut prev: Option<&AuditEntry> = None;
    for e in entries {
        match prev {
            Some(p) if e.seq != p.seq + 1 => {
                return Err(format!(
                    "seq {}: follows seq {} (entries missing or out of order)",
                    p.seq + 1,
                    p.seq
                ))
            }
            Some(p) if e.prev_hash != p.hash => {
                return Err(format!(
                    "seq {}: prev_hash does not name seq {}'s hash (an entry was changed, removed or inserted)",
                    e.seq, p.seq
                ))
            }
            None if e.seq == 1 && !e.prev_hash.is_empty() => {
                return Err("seq 1: the first entry names a previous one".into())
            }
            _ => {}
        }
        if e.computed_hash() != e.hash {
            return Err(format!(
                "seq {}: its content does not match its hash (the entry was changed)",
                e.seq
            ));
        }
        prev = Some(e);
    }
    Ok(())
}

/// Entries read per call of [`Registry::audit`].
const PAGE: usize = 1000;

/// Every entry from seq `from` on, in seq order, paged through the store.
pub fn read_all(store: &dyn Registry, from: u64) -> Result<Vec<AuditEntry>> {
    let mut out: Vec<AuditEntry> = Vec::new();
    let mut next = from.max(1);
    loop {
        let page = store.audit(next, PAGE)?;
        let n = page.len();
        if let Some(last) = page.last() {
            next = last.seq + 1;
        }
        out.extend(page);
        if n < PAGE {
            return Ok(out);
        }
    }
}

/// The admin socket's `audit` request: entries from `from` on, one JSON line each.
pub fn write_entries(store: &dyn Registry, from: u64, out: &mut dyn Write) -> Result<u64> {
    let entries = read_all(store, from)?;
    for e in &entries {
        writeln!(out, "{}", serde_json::to_string(e)?)?;
    }
    Ok(entries.len() as u64)
}

/// `ferry-exchange audit`: prints entries from `from` on as JSON lines; with
/// `verify`, checks the whole chain first and fails naming the first broken seq.
pub fn cli(config: &Path, from: u64, verify: bool) -> Result<()> {
    let cfg = crate::config::load(config)?;
    let start = if verify { 1 } else { from };
    let mut lines = Vec::new();
    crate::ask_or_open(
        &cfg,
        &crate::admin::Request::Audit { from: start },
        &mut lines,
    )?;
    let mut entries = Vec::new();
    for line in String::from_utf8_lossy(&lines).lines() {
        let e: AuditEntry = serde_json::from_str(line)
            .with_context(|| format!("an audit entry that cannot be read: {line}"))?;
        entries.push(e);
    }
    if verify {
        if let Some(first) = entries.first() {
            if first.seq != 1 {
                bail!(
                    "audit chain broken at seq 1: the log starts at seq {}",
                    first.seq
                );
            }
        }
        if let Err(why) = verify_chain(&entries) {
            bail!("audit chain broken at {why}");
        }
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for e in entries.iter().filter(|e| e.seq >= from) {
        writeln!(out, "{}", serde_json::to_string(e)?)?;
    }
    if verify {
        match entries.last() {
            Some(head) => eprintln!(
                "audit chain verified: {} entries; head seq {} hash {} (note it: a rewrite of the tail is caught only against it)",
                entries.len(),
                head.seq,
                head.hash
            ),
            None => eprintln!("audit chain verified: the log is empty"),
        }
    }
    Ok(())
}

/// Who a command-line action is recorded as: `cli:$USER` (`cli:root` when
/// `USER` is unset, as under sudo without it or in a unit).
pub fn cli_actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "root".into())
    )
}

/// Records a command-line action done outside the store (certificate files):
/// through the running exchange's admin socket, or on the store itself. The
/// action is done already, so a failure to record it is reported, not fatal.
pub fn record_cli(
    cfg: &crate::config::ExchangeConfig,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) {
    let req = crate::admin::Request::Record {
        actor: cli_actor(),
        action: action.into(),
        target: target.into(),
        detail,
    };
    let mut sink = Vec::new();
    if let Err(e) = crate::ask_or_open(cfg, &req, &mut sink) {
        eprintln!(
            "warning: {action} {target} was done but could not be recorded in the audit log: {e:#}"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chain(n: u64) -> Vec<AuditEntry> {
        let mut out: Vec<AuditEntry> = Vec::new();
        for i in 0..n {
            let e = AuditEntry::next(
                out.last(),
                1000 + i,
                "cli:root",
                "user_add",
                &format!("u{i}"),
                serde_json::json!({"role": "admin", "z": [1, {"b": 2, "a": 1}]}),
            );
            out.push(e);
        }
        out
    }

    #[test]
    fn an_unchanged_chain_verifies_and_any_change_names_its_seq() {
        let c = chain(5);
        assert_eq!(c[0].prev_hash, "");
        assert_eq!(c[4].seq, 5);
        verify_chain(&c).unwrap();
        // A later run alone verifies too (its first link cannot be checked).
        verify_chain(&c[2..]).unwrap();

        let mut changed = c.clone();
        changed[2].target = "someone-else".into();
        assert!(verify_chain(&changed).unwrap_err().starts_with("seq 3:"));

        let mut rehashed = c.clone();
        rehashed[2].detail = serde_json::json!({"role": "auditor"});
        rehashed[2].hash = rehashed[2].computed_hash();
        assert!(verify_chain(&rehashed).unwrap_err().starts_with("seq 4:"));

        let mut removed = c.clone();
        removed.remove(1);
        assert!(verify_chain(&removed).unwrap_err().starts_with("seq 2:"));
    }

    #[test]
    fn the_hash_does_not_depend_on_key_order() {
        let c = chain(1);
        let text = serde_json::to_string(&c[0]).unwrap();
        let back: AuditEntry = serde_json::from_str(&text).unwrap();
        assert_eq!(back.computed_hash(), c[0].hash);
        let mut s = String::new();
        canonical(
            &serde_json::json!({"b": 1, "a": {"d": "x", "c": null}}),
            &mut s,
        );
        assert_eq!(s, r#"{"a":{"c":null,"d":"x"},"b":1}"#);
    }
}
