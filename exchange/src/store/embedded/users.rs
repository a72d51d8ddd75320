//! Users (`u:` keys) and the audit log (`l:` keys) in the embedded store.
//!
//! Both are written and synced before the call returns: unlike the agent
//! registry, nothing rebuilds them. An audit append holds `audit_lock` from
//! reading the last entry to the end of its sync, so seqs are assigned once
//! each and every entry names its predecessor; a failed sync poisons the store
//! as a failed commit does.

use super::*;

const USER: &[u8] = b"u:";
const AUDIT: &[u8] = b"l:";

fn audit_key(seq: u64) -> Vec<u8> {
    let mut k = AUDIT.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn writable(store: &Embedded) -> Result<(), StoreError> {
    if store.poisoned() {
        return Err(StoreError::Poisoned(store.dir.clone()));
    }
    Ok(())
}

pub(super) fn put_user(store: &Embedded, user: &User) -> Result<(), StoreError> {
    writable(store)?;
    store
        .db
        .insert(key(USER, &[&user.name]), encode(user)?)
        .map_err(|e| store.sled_err(e))?;
    store.sync_or_poison()
}

pub(super) fn user(store: &Embedded, name: &str) -> Result<Option<User>, StoreError> {
    let v = store
        .db
        .get(key(USER, &[name]))
        .map_err(|e| store.sled_err(e))?;
    v.map(|v| {
        serde_json::from_slice(&v)
            .map_err(|e| StoreError::Damaged(format!("the record of user {name}: {e}")))
    })
    .transpose()
}

pub(super) fn users(store: &Embedded) -> Result<Vec<User>, StoreError> {
    let mut out = Vec::new();
    for kv in store.db.scan_prefix(USER) {
        let (k, v) = kv.map_err(|e| store.sled_err(e))?;
        out.push(serde_json::from_slice(&v).map_err(|e| {
            StoreError::Damaged(format!(
                "the record of user {}: {e}",
                String::from_utf8_lossy(&k[USER.len()..])
            ))
        })?);
    }
    Ok(out)
}

pub(super) fn remove_user(store: &Embedded, name: &str) -> Result<bool, StoreError> {
    writable(store)?;
    let old = store
        .db
        .remove(key(USER, &[name]))
        .map_err(|e| store.sled_err(e))?;
    if old.is_none() {
        return Ok(false);
    }
    store.sync_or_poison()?;
    Ok(true)
}

fn last_audit(store: &Embedded) -> Result<Option<AuditEntry>, StoreError> {
    let Some(kv) = store.db.scan_prefix(AUDIT).next_back() else {
        return Ok(None);
    };
    let (k, v) = kv.map_err(|e| store.sled_err(e))?;
    serde_json::from_slice(&v)
        .map(Some)
        .map_err(|e| StoreError::Damaged(format!("the last audit entry ({k:?}): {e}")))
}

pub(super) fn append_audit(
    store: &Embedded,
    actor: &str,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> Result<AuditEntry, StoreError> {
    let _one_appender = store
        .audit_lock
        .lock()
        .map_err(|_| StoreError::Damaged("audit lock poisoned".into()))?;
    writable(store)?;
    let prev = last_audit(store)?;
    let entry = AuditEntry::next(prev.as_ref(), now_unix_ms(), actor, action, target, detail);
    store
        .db
        .insert(audit_key(entry.seq), encode(&entry)?)
        .map_err(|e| store.sled_err(e))?;
    store.sync_or_poison()?;
    Ok(entry)
}

pub(super) fn audit(
    store: &Embedded,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<AuditEntry>, StoreError> {
    let mut out = Vec::new();
    for kv in store.db.range(audit_key(from_seq)..=audit_key(u64::MAX)) {
        if out.len() >= limit {
            break;
        }
        let (k, v) = kv.map_err(|e| store.sled_err(e))?;
        out.push(
            serde_json::from_slice(&v)
                .map_err(|e| StoreError::Damaged(format!("audit entry {k:?}: {e}")))?,
        );
    }
    Ok(out)
}

impl Embedded {
    /// Test hook: rewrites the stored audit entry `seq` (as an attacker with
    /// the store's files could), so tests can show `verify_chain` notices.
    #[cfg(test)]
    pub(in crate::store) fn tamper_audit(&self, seq: u64, change: impl FnOnce(&mut AuditEntry)) {
        #![allow(clippy::unwrap_used)]
        let v = self.db.get(audit_key(seq)).unwrap().unwrap();
        let mut e: AuditEntry = serde_json::from_slice(&v).unwrap();
        change(&mut e);
        self.db
            .insert(audit_key(seq), serde_json::to_vec(&e).unwrap())
            .unwrap();
    }
}
