//! QUIC and mutual-TLS setup shared by the agent and the exchange, the PKI that
//! issues their certificates, and frame I/O over quinn streams.
//!
//! Architecture invariant: this is the only place that configures rustls or quinn,
//! so both ends agree on TLS 1.3 only, ALPN `ferry/1`, no 0-RTT and one set of
//! transport limits.

pub mod framed;
pub mod pki;
pub mod tls;

pub use framed::{FrameReader, FrameWriter};
