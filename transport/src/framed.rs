//! `ferry/1` frames over quinn streams.

use anyhow::{Context, Result};
use ferry_protocol::frame::{self, FrameDecoder};
use ferry_protocol::messages::frame::Msg;

/// Reads frames from a QUIC receive stream.
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, limit: usize) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(limit),
            buf: vec![0; 64 * 1024],
        }
    }

    /// The next frame, or `None` when the peer finished the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Msg>> {
        loop {
            if let Some(msg) = self.decoder.next_frame()? {
                return Ok(Some(msg));
            }
            match self.recv.read(&mut self.buf).await? {
                Some(n) => self.decoder.push(&self.buf[..n]),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    pub fn into_inner(self) -> quinn::RecvStream {
        self.recv
    }
}

/// Writes frames to a QUIC send stream.
pub struct FrameWriter {
    send: quinn::SendStream,
    buf: Vec<u8>,
}

impl FrameWriter {
    pub fn new(send: quinn::SendStream) -> Self {
        Self {
            send,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, msg: Msg) -> Result<()> {
        self.buf.clear();
        frame::encode(msg, &mut self.buf);
        // Keep quinn's error as the cause: "connection lost" alone hides why (a
        // refused certificate, an idle timeout, the peer's close reason).
        self.send
            .write_all(&self.buf)
            .await
            .context("sending a frame")
    }

    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}
