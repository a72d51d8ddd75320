//! The exchange's users (of its dashboard): roles, passwords, logins with
//! lockout, and `ferry-exchange user …`.
//!
//! Users live in the store ([`Registry::put_user`] and friends), so every
//! exchange node sharing a JetStream store knows the same users. A password
//! is kept only as an argon2id PHC string (default parameters, a random salt
//! per hash); `user` commands hash it on the operator's side, so no password
//! crosses the admin socket.
//!
//! Lockout: after [`MAX_FAILURES`] consecutive failed logins an account is
//! locked for [`LOCKOUT_MS`]; a success resets the count, and `user passwd`
//! unlocks. Counting is a read, change and write of the user's record: two
//! logins racing on two nodes may count one failure instead of two.

use std::sync::Mutex;

use anyhow::{bail, Result};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};

use crate::store::{Registry, StoreError};

/// Failed logins in a row that lock an account.
pub const MAX_FAILURES: u32 = 5;
/// How long a locked account stays locked: 15 minutes.
pub const LOCKOUT_MS: u64 = 15 * 60 * 1000;
/// The shortest password `user add` and `user passwd` accept, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;

/// What a user may do, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, users included.
    Admin,
    /// Reads and acknowledges alarms.
    Operator,
    /// Reads, the audit log included; changes nothing.
    Auditor,
}

/// What a request to the dashboard needs its user's role to allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// See the fleet, streams, deliveries and alarms.
    Read,
    /// Acknowledge an alarm.
    Acknowledge,
    /// Manage users, enrol, revoke, resolve.
    Administer,
    /// Read the audit log.
    ReadAudit,
}

impl Role {
    pub fn can(self, action: Action) -> bool {
        match self {
            Role::Admin => true,
            Role::Operator => matches!(action, Action::Read | Action::Acknowledge),
            Role::Auditor => matches!(action, Action::Read | Action::ReadAudit),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "auditor" => Ok(Role::Auditor),
            other => Err(format!(
                "unknown role {other:?}: a role is admin, operator or auditor"
            )),
        }
    }
}

/// One user of the exchange.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// argon2id, PHC string format.
    pub password_hash: String,
    pub created_unix_ms: u64,
    /// Failed logins since the last success (or unlock).
    #[serde(default)]
    pub failed_logins: u32,
    /// Locked until then (Unix ms; 0: not locked).
    #[serde(default)]
    pub locked_until_unix_ms: u64,
    /// The dashboard's language: `zh` (the default) or `en`.
    #[serde(default = "default_language")]
    pub language: String,
    /// A machine user (a script, the city's big screen): the SHA-256 of its
    /// API token, hex. Such a user has no password and cannot log in; it
    /// sends `Authorization: Bearer TOKEN` with each request instead.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_sha256: String,
}

/// What a new user proves itself with.
#[derive(Debug, Clone)]
pub enum Credential {
    /// An argon2id PHC string ([`hash_password`]).
    Password(String),
    /// The SHA-256 of an API token ([`token_sha256`]), hex.
    Token(String),
}

/// Prefix of every API token, so one found in a file or a log is recognised.
pub const TOKEN_PREFIX: &str = "fxt_";

/// A new API token: the prefix and 32 random bytes, hex.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut b[..]);
    format!("{TOKEN_PREFIX}{}", hex::encode(b))
}

/// How a token is kept: its SHA-256, hex. A token is 256 random bits, so a
/// fast hash is enough (nothing to guess); it lets every request be checked
/// without argon2's cost.
pub fn token_sha256(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.trim().as_bytes()))
}

/// The machine user whose token this is.
pub fn user_of_token(store: &dyn Registry, token: &str) -> Result<Option<User>, StoreError> {
    if !token.starts_with(TOKEN_PREFIX) {
        return Ok(None);
    }
    let want = token_sha256(token);
    Ok(store
        .users()?
        .into_iter()
        .find(|u| !u.token_sha256.is_empty() && u.token_sha256 == want))
}

fn default_language() -> String {
    "zh".into()
}

impl User {
    /// A new, unlocked user (`name` checked with [`check_name`]).
    pub fn new(name: &str, role: Role, credential: Credential, now_ms: u64) -> Result<User> {
        check_name(name)?;
        let (password_hash, token_sha256) = match credential {
            Credential::Password(h) => (h, String::new()),
            Credential::Token(t) => (String::new(), t),
        };
        Ok(User {
            name: name.to_string(),
            role,
            password_hash,
            created_unix_ms: now_ms,
            failed_logins: 0,
            locked_until_unix_ms: 0,
            language: default_language(),
            token_sha256,
        })
    }

    pub fn locked_at(&self, now_ms: u64) -> bool {
        self.locked_until_unix_ms > now_ms
    }

    /// What `user list` shows: never the hash.
    pub fn listing(&self, now_ms: u64) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "role": self.role,
            "created_unix_ms": self.created_unix_ms,
            "locked": self.locked_at(now_ms),
            "locked_until_unix_ms": self.locked_until_unix_ms,
            "failed_logins": self.failed_logins,
            "language": self.language,
            "credential": if self.token_sha256.is_empty() { "password" } else { "token" },
        })
    }
}

/// A user name: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 {
        bail!(
            "user name {name:?}: must be 1 to 64 characters long (it has {})",
            name.chars().count()
        );
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        bail!("user name {name:?}: {c:?} is not allowed; use letters A-Z a-z, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// An argon2id PHC string of `password` (default parameters, random salt).
pub fn hash_password(password: &str) -> Result<String> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes)
        .map_err(|e| anyhow::anyhow!("making a password salt: {e}"))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
}

/// Whether `candidate` is the password `hash` was made from (false for a
/// hash that cannot be read).
pub fn verify_password(hash: &str, candidate: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    Argon2::default()
        .verify_password(candidate.as_bytes(), &parsed)
        .is_ok()
}

/// Why a login failed.
///
/// Tell the web caller only "wrong name or password" for both [`LoginError::Unknown`]
/// and [`LoginError::WrongPassword`] (and spend the same time on both: `login`
/// verifies against a dummy hash for an unknown name), so nobody learns which
/// names exist. [`LoginError::Locked`] may be shown as it is, and only the
/// right password ever unlocks early (`user passwd`).
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("wrong name or password")]
    Unknown,
    #[error("wrong name or password")]
    WrongPassword,
    #[error("the account is locked until {until_ms} (Unix ms) after too many failed logins")]
    Locked { until_ms: u64 },
    #[error("the store: {0}")]
    Store(#[from] StoreError),
}

/// Serializes logins in this process, so the failure count of one user is not
/// lost between two attempts made at once on this node.
static LOGINS: Mutex<()> = Mutex::new(());

/// Checks `password` for user `name` at `now_ms`, counting failures and
/// locking the account after [`MAX_FAILURES`] in a row (success resets the
/// count). Every outcome is appended to the audit log (actor `web:NAME`,
/// actions `login`, `login_failed`, `login_locked`). Blocks (argon2 and the
/// store): call it from `spawn_blocking`.
pub fn login(
    store: &dyn Registry,
    name: &str,
    password: &str,
    now_ms: u64,
) -> Result<User, LoginError> {
    let _one_at_a_time = LOGINS.lock().unwrap_or_else(|p| p.into_inner());
    let actor = format!("web:{name}");
    let known = if check_name(name).is_ok() {
        store.user(name)?
    } else {
        None
    };
    let Some(mut user) = known else {
        // The same work as for a known name.
        let _ = verify_password(dummy_hash(), password);
        // Whatever was typed, but not without bound.
        let typed: String = name.chars().take(64).collect();
        store.append_audit(
            &format!("web:{typed}"),
            "login_failed",
            &typed,
            serde_json::json!({"reason": "unknown user"}),
        )?;
        return Err(LoginError::Unknown);
    };
    if user.locked_at(now_ms) {
        store.append_audit(
            &actor,
            "login_locked",
            name,
            serde_json::json!({"locked_until_unix_ms": user.locked_until_unix_ms}),
        )?;
        return Err(LoginError::Locked {
            until_ms: user.locked_until_unix_ms,
        });
    }
    if user.locked_until_unix_ms != 0 {
        // The lock ran out: a fresh count.
        user.locked_until_unix_ms = 0;
        user.failed_logins = 0;
    }
    if verify_password(&user.password_hash, password) {
        let changed = user.failed_logins != 0;
        user.failed_logins = 0;
        if changed {
            store.put_user(&user)?;
        }
        store.append_audit(&actor, "login", name, serde_json::json!({}))?;
        return Ok(user);
    }
    user.failed_logins = user.failed_logins.saturating_add(1);
    let locked = user.failed_logins >= MAX_FAILURES;
    if locked {
        user.locked_until_unix_ms = now_ms + LOCKOUT_MS;
    }
    store.put_user(&user)?;
    store.append_audit(
        &actor,
        "login_failed",
        name,
        serde_json::json!({"reason": "wrong password", "failed_logins": user.failed_logins, "locked_until_unix_ms": user.locked_until_unix_ms}),
    )?;
    if locked {
        tracing::warn!(
            user = name,
            until_unix_ms = user.locked_until_unix_ms,
            "user locked out after too many failed logins"
        );
    }
    Err(LoginError::WrongPassword)
}

/// A hash of nothing anyone knows, to verify against for unknown names.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password("no user has this password").unwrap_or_default())
}

/// Sets a new password hash and unlocks (`user passwd`). `false`: no such user.
pub fn set_password(store: &dyn Registry, name: &str, password_hash: String) -> Result<bool> {
    let Some(mut user) = store.user(name)? else {
        return Ok(false);
    };
    user.password_hash = password_hash;
    user.failed_logins = 0;
    user.locked_until_unix_ms = 0;
    store.put_user(&user)?;
    Ok(true)
}

/// The shortest password accepted: non-empty, [`MIN_PASSWORD_CHARS`] characters at least.
pub fn check_password(password: &str) -> Result<()> {
    if password.is_empty() {
        bail!("the password is empty");
    }
    if password.chars().count() < MIN_PASSWORD_CHARS {
        bail!("the password is too short: at least {MIN_PASSWORD_CHARS} characters");
    }
    Ok(())
}

/// Adds a user (refused if the name is taken or not a valid name) and
/// audits it as `actor`'s `user_add`. `password_hash` from [`hash_password`].
pub fn add_user(
    store: &dyn Registry,
    actor: &str,
    name: &str,
    role: Role,
    credential: Credential,
) -> Result<User> {
    let now = crate::store::now_unix_ms();
    let user = User::new(name, role, credential, now)?;
    if store.user(name)?.is_some() {
        bail!("user {name} exists already; `ferry-exchange user passwd` sets its password, `user remove` removes it");
    }
    store.put_user(&user)?;
    let credential = if user.token_sha256.is_empty() {
        "password"
    } else {
        "token"
    };
    store.append_audit(
        actor,
        "user_add",
        name,
        serde_json::json!({"role": role, "credential": credential}),
    )?;
    Ok(user)
}

/// Sets a user's password hash, unlocks the account, and audits it as
/// `actor`'s `user_passwd`.
pub fn change_password(
    store: &dyn Registry,
    actor: &str,
    name: &str,
    password_hash: String,
) -> Result<()> {
    check_name(name)?;
    if store
        .user(name)?
        .is_some_and(|u| !u.token_sha256.is_empty())
    {
        bail!("user {name} signs in with an API token, not a password: `user remove` it and `user add --token-file` it again for a new token");
    }
    if !set_password(store, name, password_hash)? {
        bail!("no user {name}");
    }
    store.append_audit(actor, "user_passwd", name, serde_json::json!({}))?;
    Ok(())
}

/// Removes a user and audits it as `actor`'s `user_remove`.
pub fn remove_user(store: &dyn Registry, actor: &str, name: &str) -> Result<()> {
    check_name(name)?;
    if !store.remove_user(name)? {
        bail!("no user {name}");
    }
    store.append_audit(actor, "user_remove", name, serde_json::json!({}))?;
    Ok(())
}

mod cli;
pub use cli::{cli, execute, UserOp};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn roles_allow_what_they_should() {
        use Action::*;
        for a in [Read, Acknowledge, Administer, ReadAudit] {
            assert!(Role::Admin.can(a));
        }
        assert!(Role::Operator.can(Read) && Role::Operator.can(Acknowledge));
        assert!(!Role::Operator.can(Administer) && !Role::Operator.can(ReadAudit));
        assert!(Role::Auditor.can(Read) && Role::Auditor.can(ReadAudit));
        assert!(!Role::Auditor.can(Acknowledge) && !Role::Auditor.can(Administer));
        assert_eq!(
            serde_json::to_string(&Role::Auditor).unwrap(),
            "\"auditor\""
        );
        assert!("chief"
            .parse::<Role>()
            .unwrap_err()
            .contains("admin, operator or auditor"));
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "li.wei_2-x", &"x".repeat(64)] {
            check_name(ok).unwrap();
        }
        for bad in ["", &"x".repeat(65), "a b", "wei/1", "李"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_hash_with_argon2id_and_a_fresh_salt() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(&h, "correct horse"));
        assert!(!verify_password(&h, "correct horsE"));
        assert!(!verify_password("not a hash", "correct horse"));
        assert_ne!(h, hash_password("correct horse").unwrap());
    }
}
