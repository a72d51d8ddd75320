//! `kind = "files"`: every complete received file written under
//! `PATH/AGENT/STREAM/<its relative path>`, atomically (temporary file, fsync,
//! rename, directory fsync). The checkpoint of each (agent, stream) is
//! `PATH/.ferry/DELIVERY/AGENT/STREAM`, written the same way after the files it
//! covers: a crash between the two writes the same files again, whole and under
//! the same names, so a reader never sees a partial or doubled file.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use ferry_protocol::messages::{record::Body, Record};
use tracing::{info, warn};

use super::DeliveryError;
use crate::config::DeliverySection;
use crate::store::SharedStore;

pub struct FilesSink {
    root: PathBuf,
    delivery: String,
}

fn io_retry(what: String) -> impl FnOnce(io::Error) -> DeliveryError {
    move |e| DeliveryError::Retry(format!("{what}: {e}"))
}

impl FilesSink {
    pub fn open(d: &DeliverySection) -> Result<FilesSink, DeliveryError> {
        let root = d.path.clone().ok_or_else(|| {
            DeliveryError::Fatal(format!("[[delivery]] {:?} has no path", d.name))
        })?;
        create_dirs(&root).map_err(io_retry(format!("creating {}", root.display())))?;
        Ok(FilesSink {
            root,
            delivery: d.name.clone(),
        })
    }

    fn checkpoint_path(&self, agent: &str, stream: &str) -> PathBuf {
        self.root
            .join(".ferry")
            .join(&self.delivery)
            .join(agent)
            .join(stream)
    }

    pub fn checkpoint(&self, agent: &str, stream: &str) -> Result<u64, DeliveryError> {
        let p = self.checkpoint_path(agent, stream);
        match fs::read_to_string(&p) {
            Ok(s) => s.trim().parse().map_err(|_| {
                DeliveryError::Fatal(format!(
                    "checkpoint {} holds {:?}, not a seq; remove it to deliver the stream again from seq 1",
                    p.display(),
                    s.trim()
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(DeliveryError::Retry(format!("reading {}: {e}", p.display()))),
        }
    }

    pub async fn apply(
        &self,
        store: &SharedStore,
        agent: &str,
        stream: &str,
        records: Vec<(u64, Record)>,
        last: u64,
    ) -> Result<(), DeliveryError> {
        let store = store.clone();
        let dir = self.root.join(agent).join(stream);
        let checkpoint = self.checkpoint_path(agent, stream);
        let (agent, stream) = (agent.to_string(), stream.to_string());
        tokio::task::spawn_blocking(move || {
            for (seq, r) in &records {
                let Some(Body::FileChunk(c)) = &r.body else {
                    continue;
                };
                let rec = store
                    .file(&agent, &stream, &c.file_id)
                    .map_err(|e| DeliveryError::Retry(e.to_string()))?;
                // Files that did not arrive intact are not delivered; the agent
                // sends them again under a new id.
                if rec.as_ref().is_none_or(|f| f.status != "complete" || f.seq != *seq) {
                    continue;
                }
                let Some(rel) = crate::records::safe_relative(&c.path) else {
                    warn!(agent, stream, path = %c.path, "file not delivered: its path leaves the stream's directory");
                    continue;
                };
                let dest = dir.join(rel);
                let mut src = store
                    .open_file(&agent, &stream, &c.file_id)
                    .map_err(|e| DeliveryError::Retry(e.to_string()))?;
                write_atomic(&dest, &mut src, *seq)
                    .map_err(io_retry(format!("writing {}", dest.display())))?;
                info!(agent, stream, path = %c.path, seq, "file delivered");
            }
            ferry_transport::failpoint::hit("delivery-after-write-before-checkpoint")
                .map_err(io_retry("delivering".into()))?;
            write_atomic(&checkpoint, &mut format!("{last}\n").as_bytes(), last).map_err(
                io_retry(format!("writing the checkpoint {}", checkpoint.display())),
            )
        })
        .await
        .map_err(|e| DeliveryError::Retry(e.to_string()))?
    }
}

/// Creates `dir` and its missing parents, each made durable in its parent.
fn create_dirs(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d.filter(|p| !p.exists()) {
        missing.push(p.to_path_buf());
        d = p.parent();
    }
    fs::create_dir_all(dir)?;
    for m in missing.iter().rev() {
        if let Some(parent) = m.parent() {
            File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// Writes `dest` whole or not at all: a temporary file beside it, fsynced,
/// renamed over it, the directory fsynced.
fn write_atomic(dest: &Path, src: &mut dyn io::Read, tag: u64) -> io::Result<()> {
    let dir = dest
        .parent()
        .ok_or_else(|| io::Error::other("no parent directory"))?;
    create_dirs(dir)?;
    let name = dest
        .file_name()
        .ok_or_else(|| io::Error::other("no file name"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{tag}.ferry-tmp"));
    let mut f = File::create(&tmp)?;
    io::copy(src, &mut f)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dest)?;
    File::open(dir)?.sync_all()
}
