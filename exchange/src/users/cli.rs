//! `ferry-exchange user …`: the commands, and what they ask of the store
//! (through the running exchange's admin socket, or on the store itself).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::*;

use crate::cli::UserCommand;

/// What the admin socket carries for `user` commands: hashes, never passwords.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum UserOp {
    Add {
        name: String,
        role: Role,
        /// Empty for a machine user.
        password_hash: String,
        /// A machine user's token's SHA-256 (see [`User::token_sha256`]).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        token_sha256: String,
        actor: String,
    },
    Passwd {
        name: String,
        password_hash: String,
        actor: String,
    },
    Remove {
        name: String,
        actor: String,
    },
    List {
        actor: String,
    },
}

/// Runs `ferry-exchange user …`: through the running exchange's admin socket,
/// or on the store itself when none runs.
pub fn cli(cmd: UserCommand) -> Result<()> {
    let actor = crate::audit::cli_actor();
    let (config, op) = match cmd {
        UserCommand::Add {
            config,
            name,
            role,
            password_file,
            token_file,
        } => {
            let role: Role = role
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--role: {e}"))?;
            check_name(&name).context("--name")?;
            let (password_hash, token_sha256) = match (password_file, token_file) {
                (Some(p), _) => (hash_password(&read_password(&p)?)?, String::new()),
                (None, Some(t)) => (String::new(), token_sha256(&write_token(&t)?)),
                (None, None) => anyhow::bail!("--password-file or --token-file is needed"),
            };
            let op = UserOp::Add {
                name,
                role,
                password_hash,
                token_sha256,
                actor,
            };
            (config, op)
        }
        UserCommand::Passwd {
            config,
            name,
            password_file,
        } => {
            check_name(&name).context("--name")?;
            let password = read_password(&password_file)?;
            let op = UserOp::Passwd {
                name,
                password_hash: hash_password(&password)?,
                actor,
            };
            (config, op)
        }
        UserCommand::Remove { config, name } => (config, UserOp::Remove { name, actor }),
        UserCommand::List { config } => (config, UserOp::List { actor }),
    };
    let cfg = crate::config::load(&config)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    crate::ask_or_open(&cfg, &crate::admin::Request::User { op }, &mut out)
}

/// Writes a new API token to `path` (created with mode 0600; an existing file
/// is refused, so no token is overwritten by mistake) and returns it.
fn write_token(path: &Path) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let token = new_token();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "--token-file {}: creating it (it must not exist yet)",
                path.display()
            )
        })?;
    writeln!(f, "{token}")
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing the token to {}", path.display()))?;
    Ok(token)
}

/// The password in the first line of `path` (its line ending stripped).
fn read_password(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the password file {}", path.display()))?;
    let first = text.lines().next().unwrap_or_default();
    check_password(first).with_context(|| {
        format!(
            "the password file {} (its first line is the password)",
            path.display()
        )
    })?;
    Ok(first.to_string())
}

/// The admin socket's `user` request, on the exchange's store.
pub fn execute(store: &dyn Registry, op: &UserOp, out: &mut dyn Write) -> Result<u64> {
    match op {
        UserOp::Add {
            name,
            role,
            password_hash,
            token_sha256,
            actor,
        } => {
            let credential = if token_sha256.is_empty() {
                Credential::Password(password_hash.clone())
            } else {
                Credential::Token(token_sha256.clone())
            };
            let user = add_user(store, actor, name, *role, credential)?;
            writeln!(out, "{}", user.listing(crate::store::now_unix_ms()))?;
            Ok(1)
        }
        UserOp::Passwd {
            name,
            password_hash,
            actor,
        } => {
            change_password(store, actor, name, password_hash.clone())?;
            Ok(0)
        }
        UserOp::Remove { name, actor } => {
            remove_user(store, actor, name)?;
            Ok(0)
        }
        UserOp::List { actor } => {
            let now = crate::store::now_unix_ms();
            let mut users = store.users()?;
            users.sort_by(|a, b| a.name.cmp(&b.name));
            for u in &users {
                writeln!(out, "{}", u.listing(now))?;
            }
            store.append_audit(actor, "user_list", "", serde_json::json!({}))?;
            Ok(users.len() as u64)
        }
    }
}
