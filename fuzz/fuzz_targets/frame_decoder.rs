//! `FrameDecoder` on arbitrary bytes, pushed in arbitrary pieces.
//!
//! * It never panics.
//! * Where the input is cut makes no difference: the frames (and the error that
//!   ends the stream, if any) are those of the same bytes pushed at once.
//! * `wanted()` is always at least 1, `buffered()` counts what is held, and
//!   `finish()` fails exactly when a partial frame is left.
//! * Every frame it yields re-encodes (`frame::encode`) to bytes that decode to
//!   the same message, and that encoding is a fixed point.
#![no_main]

use arbitrary::Arbitrary;
use ferry_protocol::frame::{encode, encode_to_vec, FrameDecoder, FrameError, MAX_FRAME};
use ferry_protocol::messages::frame::Msg;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// A small limit reaches `TooLarge` with short inputs.
    small_limit: Option<u16>,
    /// Lengths of the pieces the bytes are pushed in (each taken modulo what is left).
    cuts: Vec<u16>,
    bytes: Vec<u8>,
}

/// What a decoder made of a byte stream: its frames, then the error or the
/// end-of-input verdict.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Msg>,
    end: Result<(), FrameError>,
}

/// Takes every complete frame out; `Err` ends the stream (the decoder is out of sync).
fn drain(d: &mut FrameDecoder, limit: usize, frames: &mut Vec<Msg>) -> Result<(), FrameError> {
    loop {
        let before = d.buffered();
        assert!(
            d.wanted() >= 1,
            "wanted() is 0 with {before} bytes buffered"
        );
        match d.next_frame() {
            Ok(Some(msg)) => {
                assert!(
                    d.buffered() < before,
                    "a frame came out but nothing was consumed"
                );
                frames.push(msg);
            }
            Ok(None) => {
                assert_eq!(d.buffered(), before, "Ok(None) consumed bytes");
                match d.pending_len() {
                    None => assert!(before < 4),
                    Some(len) => {
                        assert!(
                            len <= limit,
                            "an over-limit length {len} is waiting for more"
                        );
                        assert!(before < 4 + len);
                        assert_eq!(d.wanted(), 4 + len - before);
                    }
                }
                if before < 4 {
                    assert_eq!(d.wanted(), 4 - before);
                }
                return Ok(());
            }
            Err(e) => {
                if let FrameError::TooLarge { len, limit: l } = e {
                    assert_eq!(l, limit);
                    assert!(len > limit);
                }
                assert!(!matches!(e, FrameError::Truncated { .. }));
                return Err(e);
            }
        }
    }
}

fn run(bytes: &[u8], pieces: &[usize], limit: usize) -> Outcome {
    let mut d = FrameDecoder::new(limit);
    let mut frames = Vec::new();
    let mut at = 0;
    for &n in pieces {
        d.push(&bytes[at..at + n]);
        at += n;
        if let Err(e) = drain(&mut d, limit, &mut frames) {
            return Outcome {
                frames,
                end: Err(e),
            };
        }
    }
    assert_eq!(at, bytes.len());
    let end = d.finish();
    assert_eq!(end.is_ok(), d.buffered() == 0);
    if let Err(FrameError::Truncated { buffered }) = end {
        assert_eq!(buffered, d.buffered());
    }
    Outcome { frames, end }
}

fn check_reencodes(msg: &Msg) {
    let bytes = encode_to_vec(msg.clone());
    let mut appended = vec![0xAA];
    encode(msg.clone(), &mut appended);
    assert_eq!(
        &appended[1..],
        &bytes[..],
        "encode and encode_to_vec differ"
    );
    let mut d = FrameDecoder::new(MAX_FRAME.max(bytes.len()));
    d.push(&bytes);
    let again = d
        .next_frame()
        .unwrap_or_else(|e| panic!("a decoded frame re-encodes to bytes that fail: {e}"));
    assert_eq!(
        again.as_ref(),
        Some(msg),
        "re-encoded frame decodes differently"
    );
    assert_eq!(d.next_frame(), Ok(None));
    assert_eq!(d.finish(), Ok(()));
    // The encoding of a decoded message is canonical: encoding it again changes nothing.
    if let Some(again) = again {
        assert_eq!(encode_to_vec(again), bytes);
    }
}

fuzz_target!(|input: Input| {
    let limit = input.small_limit.map_or(MAX_FRAME, usize::from);
    let bytes = &input.bytes;
    let mut pieces = Vec::new();
    let mut left = bytes.len();
    for &c in &input.cuts {
        let n = usize::from(c) % (left + 1);
        pieces.push(n);
        left -= n;
    }
    pieces.push(left);

    let whole = run(bytes, &[bytes.len()], limit);
    let cut = run(bytes, &pieces, limit);
    assert_eq!(
        cut, whole,
        "pushing the bytes in pieces {pieces:?} changes what is decoded"
    );
    for msg in &whole.frames {
        check_reencodes(msg);
    }
});
