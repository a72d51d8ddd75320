//! `ferry/1` frames over a link's streams (quinn's, or yamux's over TCP).

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::link::{RecvHalf, SendHalf};
use ferry_protocol::frame::{self, FrameDecoder};
use ferry_protocol::messages::frame::Msg;

/// Reads frames from a stream's receive half. Reads take only what the frame
/// being assembled still needs ([`FrameDecoder::room`]), so between frames a
/// reader holds no buffer at all.
pub struct FrameReader {
    recv: RecvHalf,
    decoder: FrameDecoder,
}

/// The most one read takes once a frame's buffer is small (it grows with what
/// arrived: see [`FrameDecoder::room`]).
const READ_MAX: usize = 64 * 1024;

impl FrameReader {
    /// Over any receive half: a quinn `RecvStream`, a [`RecvHalf`] of a link.
    pub fn new(recv: impl AsyncRead + Send + Unpin + 'static, limit: usize) -> Self {
        Self {
            recv: Box::new(recv),
            decoder: FrameDecoder::new(limit),
        }
    }

    /// Bytes of memory this reader holds for a partial frame; 0 between frames.
    pub fn held(&self) -> usize {
        self.decoder.held()
    }

    /// The next frame, or `None` when the peer finished the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Msg>> {
        loop {
            if let Some(msg) = self.decoder.next_frame()? {
                return Ok(Some(msg));
            }
            if self.read().await? == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
        }
    }

    /// One read into the decoder; 0 at the end of the stream. Cancel-safe.
    async fn read(&mut self) -> std::io::Result<usize> {
        self.recv.read_buf(&mut self.decoder.room(READ_MAX)).await
    }

    /// The next frame, like [`next`](Self::next), for a peer that must not make
    /// this end hold more than it allows: before a frame's body is read, its
    /// declared length is granted by `budget` (awaited: the peer is slowed by flow
    /// control, not refused); and once a frame has begun it must arrive whole
    /// within `frame_timeout`, so a stalled half frame cannot hold memory for
    /// ever. The grant is returned with the frame: drop it when the frame's work
    /// is done (at the exchange: when its batch is acknowledged).
    pub async fn next_within(
        &mut self,
        budget: &Budget,
        frame_timeout: std::time::Duration,
    ) -> Result<Option<(Msg, Grant)>> {
        let mut grant: Option<Grant> = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            if let Some(msg) = self.decoder.next_frame()? {
                let g = match grant.take() {
                    Some(g) => g,
                    // A frame that arrived whole in one read: granted now.
                    None => budget.grant(frame_cost(&msg)).await?,
                };
                return Ok(Some((msg, g)));
            }
            if grant.is_none() {
                if let Some(len) = self.decoder.pending_len() {
                    grant = Some(budget.grant(len).await?);
                }
            }
            if deadline.is_none() && self.decoder.buffered() > 0 {
                deadline = Some(tokio::time::Instant::now() + frame_timeout);
            }
            let read = self.read();
            let got = match deadline {
                None => read.await?,
                Some(d) => tokio::time::timeout_at(d, read).await.map_err(|_| {
                    anyhow::anyhow!(
                        "a frame did not arrive whole within {frame_timeout:?} of its first byte ({} bytes so far)",
                        self.decoder.buffered()
                    )
                })??,
            };
            if got == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
        }
    }

    pub fn into_inner(self) -> RecvHalf {
        self.recv
    }
}

/// Writes frames to a stream's send half.
pub struct FrameWriter {
    send: SendHalf,
    buf: Vec<u8>,
}

impl FrameWriter {
    /// Over any send half: a quinn `SendStream`, a [`SendHalf`] of a link.
    pub fn new(send: impl AsyncWrite + Send + Unpin + 'static) -> Self {
        Self {
            send: Box::new(send),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, msg: Msg) -> Result<()> {
        self.encode(msg);
        // Keep the transport's error as the cause: "connection lost" alone hides
        // why (a refused certificate, an idle timeout, the peer's close reason).
        self.send
            .write_all(&self.buf)
            .await
            .context("sending a frame")?;
        self.sent();
        // yamux's writes go to its connection's queue at once; quinn's flush is
        // a no-op. Flushing keeps a frame from waiting in a buffer on either.
        self.send.flush().await.context("sending a frame")
    }

    fn encode(&mut self, msg: Msg) {
        self.buf.clear();
        frame::encode(msg, &mut self.buf);
    }

    /// After a frame is written: a large frame's buffer is not kept for the
    /// next (a stream's batches are far apart when it is quiet); small ones are.
    fn sent(&mut self) {
        if self.buf.capacity() > READ_MAX {
            self.buf = Vec::new();
        }
    }

    /// Bytes of memory this writer holds between frames.
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }

    /// As [`send`](Self::send), the frame's bytes written in pieces of at most
    /// `piece` bytes, each after `pace(len)` returned: a rate limit that spreads
    /// a large frame over time instead of letting it leave in one burst.
    pub async fn send_paced<F, Fut>(&mut self, msg: Msg, piece: usize, mut pace: F) -> Result<()>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        self.encode(msg);
        for chunk in self.buf.chunks(piece.max(1)) {
            pace(chunk.len()).await;
            self.send
                .write_all(chunk)
                .await
                .context("sending a frame")?;
        }
        self.sent();
        self.send.flush().await.context("sending a frame")
    }

    /// Ends the stream: the peer reads its end after the frames sent (for quinn,
    /// `shutdown` is `finish`; for yamux, a FIN).
    pub async fn finish(&mut self) {
        let _ = self.send.shutdown().await;
    }
}

/// What a decoded frame that was not granted ahead of time is charged.
fn frame_cost(msg: &Msg) -> usize {
    match msg {
        Msg::Batch(b) => b.payload.len(),
        _ => 0,
    }
}

/// Bytes a peer may have this end hold: a limit per connection and one shared
/// by all connections (each a semaphore of KiB permits).
#[derive(Clone)]
pub struct Budget {
    connection: std::sync::Arc<tokio::sync::Semaphore>,
    shared: std::sync::Arc<tokio::sync::Semaphore>,
    connection_kib: u32,
}

/// Bytes granted by a [`Budget`]; given back when dropped.
pub struct Grant {
    _connection: Option<tokio::sync::OwnedSemaphorePermit>,
    _shared: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Budget {
    /// A connection's budget of `connection_bytes`, drawing on `shared`
    /// (see [`Budget::shared`]).
    pub fn new(connection_bytes: u64, shared: std::sync::Arc<tokio::sync::Semaphore>) -> Self {
        let kib = u32::try_from(connection_bytes / 1024)
            .unwrap_or(u32::MAX)
            .max(1);
        Self {
            connection: std::sync::Arc::new(tokio::sync::Semaphore::new(kib as usize)),
            shared,
            connection_kib: kib,
        }
    }

    /// The pool all connections draw on, of `bytes`.
    pub fn shared(bytes: u64) -> std::sync::Arc<tokio::sync::Semaphore> {
        let kib = usize::try_from(bytes / 1024)
            .unwrap_or(usize::MAX >> 4)
            .max(1);
        std::sync::Arc::new(tokio::sync::Semaphore::new(
            kib.min(tokio::sync::Semaphore::MAX_PERMITS),
        ))
    }

    /// Waits until `bytes` may be held: first by this connection (so a greedy
    /// peer waits on its own acks), then from the shared pool.
    pub async fn grant(&self, bytes: usize) -> Result<Grant> {
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.connection_kib);
        if kib == 0 {
            return Ok(Grant {
                _connection: None,
                _shared: None,
            });
        }
        let connection = self
            .connection
            .clone()
            .acquire_many_owned(kib)
            .await
            .context("the connection's budget is closed")?;
        let shared = self
            .shared
            .clone()
            .acquire_many_owned(kib)
            .await
            .context("the exchange's budget is closed")?;
        Ok(Grant {
            _connection: Some(connection),
            _shared: Some(shared),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::messages::{Ack, Batch};

    fn batch(len: usize, seq: u64) -> Msg {
        Msg::Batch(Batch {
            stream: "s".into(),
            first_seq: seq,
            record_count: 1,
            payload: (0..len).map(|i| (i * 7 + seq as usize) as u8).collect(),
            ..Default::default()
        })
    }

    /// Thousands of streams at an exchange each sit between frames most of the
    /// time: neither end may keep a frame's buffer there.
    #[tokio::test]
    async fn reader_and_writer_hold_nothing_between_frames() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut writer = FrameWriter::new(a);
        let mut reader = FrameReader::new(b, frame::MAX_FRAME);
        // Small, medium and large frames, each read whole before the next.
        for (seq, len) in [(1u64, 7_000usize), (2, 300_000), (3, 40), (4, 3 << 20)] {
            let sent = batch(len, seq);
            let send = writer.send(sent.clone());
            let (sent_ok, got) = tokio::join!(send, reader.next());
            sent_ok.unwrap();
            assert_eq!(got.unwrap(), Some(sent), "frame of {len} bytes");
            assert_eq!(reader.held(), 0, "reader after a frame of {len} bytes");
            assert!(
                writer.held() <= READ_MAX,
                "writer keeps {} bytes after a frame of {len}",
                writer.held()
            );
        }
        // Frames written back to back are still read one at a time, whole.
        for seq in 10..20 {
            writer.send(batch(5_000, seq)).await.unwrap();
        }
        writer
            .send(Msg::Ack(Ack {
                stream: "s".into(),
                up_to_seq: 9,
                rejected_files: vec![],
            }))
            .await
            .unwrap();
        for seq in 10..20 {
            assert_eq!(reader.next().await.unwrap(), Some(batch(5_000, seq)));
            assert_eq!(reader.held(), 0);
        }
        assert!(matches!(reader.next().await.unwrap(), Some(Msg::Ack(_))));
        writer.finish().await;
        assert_eq!(reader.next().await.unwrap(), None);
    }

    /// A frame still arriving is cut off by `next_within`'s timeout without
    /// losing the bytes already read: the read is cancel-safe.
    #[tokio::test]
    async fn a_read_cancelled_mid_frame_keeps_what_arrived() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(b, frame::MAX_FRAME);
        let bytes = frame::encode_to_vec(batch(10_000, 1));
        a.write_all(&bytes[..3_000]).await.unwrap();
        let cut = tokio::time::timeout(std::time::Duration::from_millis(50), reader.next()).await;
        assert!(cut.is_err(), "no frame before its end arrived");
        assert!(reader.held() >= 3_000);
        a.write_all(&bytes[3_000..]).await.unwrap();
        assert_eq!(reader.next().await.unwrap(), Some(batch(10_000, 1)));
        assert_eq!(reader.held(), 0);
    }
}
