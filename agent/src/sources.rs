//! Each stream's source: built once from its configuration and run by
//! [`ferry_adapters::supervise`], which starts a new instance from the last
//! durable position after a retryable error (with backoff) and stops the stream
//! after a fatal one. This module only wires it to the buffer and shows what
//! happens in `status`, the metrics and the heartbeat (through the [`Board`]); it
//! names no kind of source.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_adapters::{supervise, CommitRequest, Event, SourceConfig, SourceContext, SourceError};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

use crate::buffer::Buffer;
use crate::status::Board;

/// Everything one stream's source task needs.
pub struct StreamSource {
    /// The index the stream commits under ([`crate::committer::Slots`]).
    pub index: usize,
    pub name: String,
    pub config: SourceConfig,
    pub buffer: Arc<Buffer>,
    pub board: Arc<Board>,
    pub acked: watch::Receiver<u64>,
    pub commits: mpsc::Sender<CommitRequest>,
    pub shutdown: CancellationToken,
    /// Scratch files of instances in progress (`SourceContext::spool_dir`).
    pub spool_dir: PathBuf,
}

/// What `status` shows for a stream stopped by a fatal error.
pub fn stopped_message(error: &SourceError) -> String {
    format!(
        "ALARM: stopped (not restarted until the agent reloads or restarts): {error}. Once that is fixed, reload the agent (systemctl reload ferry-agent), which starts stopped streams again"
    )
}

impl StreamSource {
    pub fn spawn(self) -> JoinHandle<()> {
        let span = info_span!("stream", stream = %self.name, kind = self.config.kind());
        tokio::spawn(self.run().instrument(span))
    }

    async fn run(self) {
        info!("source starting");
        let source = self.config.build();
        let context = || {
            let resume = self.buffer.position(&self.name).map_err(|e| {
                SourceError::Buffer(format!("cannot read the source position: {e}"))
            })?;
            let mut ctx = SourceContext::new(
                self.index,
                self.name.clone(),
                resume,
                self.buffer.state(&self.name).head,
                self.acked.clone(),
                self.shutdown.clone(),
                self.commits.clone(),
            );
            ctx.spool_dir = Some(self.spool_dir.clone());
            ctx.failpoint = ferry_transport::failpoint::hit;
            ctx.rejected_files = Some(self.buffer.clone());
            Ok(ctx)
        };
        let (board, i) = (&self.board, self.name.as_str());
        // Restarting resumes from the last durable position, so a failed source
        // loses nothing; a stopped one keeps its position for the next start.
        supervise(&*source, context, &self.shutdown, |event| match event {
            Event::Failed { error, .. } => board.set_source_error(i, Some(error.to_string())),
            Event::Recovered => board.set_source_error(i, None),
            Event::Stopped { error } => board.set_source_error(i, Some(stopped_message(error))),
        })
        .await;
    }
}
