//! Runtime pieces both daemons share: QUIC and mutual-TLS setup, the TCP
//! fallback link (TLS 1.3 + yamux), the PKI that issues their certificates,
//! frame I/O over either transport's streams, and durable commits
//! of sled databases.
//!
//! Architecture invariant: this is the only place that configures rustls or quinn,
//! so both ends agree on TLS 1.3 only, ALPN `ferry/1`, no 0-RTT and one set of
//! transport limits.

pub mod durable;
pub mod failpoint;
pub mod framed;
pub mod link;
pub mod pki;
pub mod segments;
pub mod tls;

pub use framed::{FrameReader, FrameWriter};
pub use link::{Link, LinkError};
