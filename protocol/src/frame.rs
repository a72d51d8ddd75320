//! Length-prefixed framing.
//!
//! ```text
//! +----------------+---------------------------+
//! | len: u32 BE    | Frame (protobuf), len B   |
//! +----------------+---------------------------+
//! ```
//!
//! `len` is checked against a hard limit before a single byte of the body is
//! buffered, so a peer cannot make the other end allocate more than the limit.

use prost::Message;

use crate::messages::{frame::Msg, Frame};

/// Default and maximum frame size: 16 MiB. A batch is at most
/// [`crate::batch::MAX_RAW_BATCH`] before compression, so it always fits.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("frame is not a valid ferry/1 message: {0}")]
    Decode(String),
    #[error("frame carries no message")]
    Empty,
    #[error("connection ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

/// Encodes one message as a frame, appending to `out`.
pub fn encode(msg: Msg, out: &mut Vec<u8>) {
    let frame = Frame { msg: Some(msg) };
    let len = frame.encoded_len();
    out.reserve(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a Vec cannot run out of space.
    let _ = frame.encode(out);
}

/// Encodes one message as a new frame.
pub fn encode_to_vec(msg: Msg) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out);
    out
}

/// Incremental decoder: feed it bytes as they arrive, take frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    limit: usize,
}

impl FrameDecoder {
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Where the next read from the stream goes: room for what the frame being
    /// assembled still needs and no more, at most `max_read` bytes, or as many
    /// as are buffered already, at a time (so a large frame's buffer grows
    /// geometrically with what arrives, never ahead of it). A reader that
    /// fills only this never reads past a frame, so the decoder holds nothing
    /// between frames: an exchange with thousands of quiet streams keeps no
    /// buffer for any of them. Filling it (e.g. with tokio's `read_buf`) is
    /// cancel-safe: bytes count only once they are written.
    pub fn room(&mut self, max_read: usize) -> prost::bytes::buf::Limit<&mut Vec<u8>> {
        use prost::bytes::BufMut;
        let n = self.wanted().min(max_read.max(self.buf.len()));
        self.buf.reserve_exact(n);
        (&mut self.buf).limit(n)
    }

    /// Bytes of memory held for a partial frame (its buffer's capacity).
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }

    /// How many body bytes the next frame still needs, so a reader can size its
    /// next read; 4 when even the length is not there yet.
    pub fn wanted(&self) -> usize {
        match self.header() {
            None => 4 - self.buf.len(),
            Some(len) => (4 + len).saturating_sub(self.buf.len()).max(1),
        }
    }

    /// The declared length of the frame being assembled, once its header is in.
    pub fn pending_len(&self) -> Option<usize> {
        self.header()
    }

    /// Bytes buffered (a partial frame, or more).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn header(&self) -> Option<usize> {
        let b: [u8; 4] = self.buf.get(..4)?.try_into().ok()?;
        Some(u32::from_be_bytes(b) as usize)
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    /// After an error the decoder must be discarded: the stream is out of sync.
    pub fn next_frame(&mut self) -> Result<Option<Msg>, FrameError> {
        let Some(len) = self.header() else {
            return Ok(None);
        };
        if len > self.limit {
            return Err(FrameError::TooLarge {
                len,
                limit: self.limit,
            });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let decoded = Frame::decode(&self.buf[4..4 + len]);
        if self.buf.len() == 4 + len {
            // Nothing of the next frame yet: hold no memory until it comes.
            self.buf = Vec::new();
        } else {
            self.buf.drain(..4 + len);
        }
        match decoded {
            Ok(Frame { msg: Some(msg) }) => Ok(Some(msg)),
            Ok(Frame { msg: None }) => Err(FrameError::Empty),
            Err(e) => Err(FrameError::Decode(e.to_string())),
        }
    }

    /// Call at end of input: errors if a partial frame is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Ack, Hello};
    use proptest::prelude::*;

    #[test]
    fn round_trip_split_anywhere() {
        let mut bytes = Vec::new();
        encode(
            Msg::Ack(Ack {
                stream: "s".into(),
                up_to_seq: 42,
                ..Default::default()
            }),
            &mut bytes,
        );
        encode(
            Msg::Hello(Hello {
                agent_id: "a".into(),
                ..Default::default()
            }),
            &mut bytes,
        );
        for split in 0..bytes.len() {
            let mut d = FrameDecoder::new(MAX_FRAME);
            d.push(&bytes[..split]);
            let mut got = Vec::new();
            while let Some(m) = d.next_frame().unwrap() {
                got.push(m);
            }
            d.push(&bytes[split..]);
            while let Some(m) = d.next_frame().unwrap() {
                got.push(m);
            }
            assert_eq!(got.len(), 2, "split at {split}");
            d.finish().unwrap();
        }
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut d = FrameDecoder::new(1024);
        d.push(&(1025u32).to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: 1025,
                limit: 1024
            })
        );
    }

    #[test]
    fn truncated_input_is_reported() {
        let bytes = encode_to_vec(Msg::Ack(Ack::default()));
        let mut d = FrameDecoder::new(MAX_FRAME);
        d.push(&bytes[..bytes.len() - 1]);
        assert_eq!(d.next_frame(), Ok(None));
        assert!(matches!(d.finish(), Err(FrameError::Truncated { .. })));
    }

    proptest! {
        /// Garbage never panics the decoder: it yields frames, asks for more, or errors.
        #[test]
        fn garbage_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut d = FrameDecoder::new(4096);
            'outer: for c in chunks {
                d.push(&c);
                loop {
                    match d.next_frame() {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
            }
        }

        #[test]
        fn any_ack_round_trips(stream in ".{0,40}", seq in any::<u64>()) {
            let msg = Msg::Ack(Ack { stream, up_to_seq: seq, ..Default::default() });
            let bytes = encode_to_vec(msg.clone());
            let mut d = FrameDecoder::new(MAX_FRAME);
            d.push(&bytes);
            prop_assert_eq!(d.next_frame().unwrap(), Some(msg));
        }
    }
}
