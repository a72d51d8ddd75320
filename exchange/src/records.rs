//! What operators read out of the store: `records` (JSON lines) and `export`
//! (received files written out). Both work on an open [`Store`], whether the
//! command opened it itself or asked the running exchange over its admin socket.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine;
use ferry_protocol::messages::record::Body;
use serde_json::{json, Value};

use crate::store::Store;

fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Writes a stream's records from `from` on as JSON lines: a line of a tailed file
/// is one record (its text, or base64 when it is not UTF-8); a file is one record
/// (path, size, sha256, status), at the seq of its last chunk.
pub fn write_records(
    store: &Store,
    agent: &str,
    stream: &str,
    from: u64,
    out: &mut dyn Write,
) -> Result<u64> {
    let mut n = 0u64;
    let mut failure = None;
    store.records(agent, stream, from, |r, stored_ms| {
        let mut line = json!({
            "seq": r.seq,
            "time": rfc3339(r.record.time_unix_ms),
            "stored": rfc3339(stored_ms),
            "position": r.record.position,
        });
        let body: Option<(&str, Value)> = match &r.record.body {
            Some(Body::Line(bytes)) => Some(match std::str::from_utf8(bytes) {
                Ok(s) => ("text", json!(s)),
                Err(_) => (
                    "base64",
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
                ),
            }),
            Some(Body::FileChunk(c)) if c.end.is_some() => {
                let rec = store.file(agent, stream, &c.file_id).ok().flatten();
                let end = c.end.clone().unwrap_or_default();
                Some((
                    "file",
                    json!({
                        "path": c.path,
                        "size": end.size,
                        "sha256": hex::encode(&end.sha256),
                        "file_id": c.file_id,
                        "status": rec.map_or("unknown".to_string(), |r| r.status),
                    }),
                ))
            }
            // Intermediate chunks and aborted transfers are not records of their own.
            _ => None,
        };
        let Some((k, v)) = body else { return true };
        if let Some(obj) = line.as_object_mut() {
            obj.insert(k.to_string(), v);
        }
        if let Err(e) = writeln!(out, "{line}") {
            failure = Some(e);
            return false;
        }
        n += 1;
        true
    })?;
    if let Some(e) = failure {
        // A closed pipe (`| head`) is how a reader says it has seen enough.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    Ok(n)
}

/// A received path made safe to join under the export directory.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Writes every complete file of a stream under `to`, keeping relative paths.
/// A file received twice under one path (re-sent after a change) keeps the last.
pub fn export(
    store: &Store,
    agent: &str,
    stream: &str,
    to: &Path,
    out: &mut dyn Write,
) -> Result<u64> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut n = 0;
    for f in store.files(agent, stream)? {
        if f.status != "complete" {
            continue;
        }
        let Some(rel) = safe_relative(&f.path) else {
            writeln!(
                out,
                "{}",
                json!({"skipped": f.path, "reason": "unsafe path"})
            )?;
            continue;
        };
        let dest = to.join(&rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let src = store.file_path(agent, stream, &f.file_id);
        std::fs::copy(&src, &dest)
            .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
        writeln!(
            out,
            "{}",
            json!({"exported": dest, "size": f.size, "sha256": f.sha256})
        )?;
        n += 1;
    }
    if n == 0 && store.files(agent, stream)?.is_empty() && store.next_expected(agent, stream)? == 1
    {
        bail!("the store holds nothing for agent {agent:?} stream {stream:?}");
    }
    Ok(n)
}
