//! citycard wire protocol: frame layout, typed messages, sans-IO codec and cryptogram helpers.
//!
//! The normative description is `PROTOCOL.md` beside this crate; its hex test vectors are
//! checked against this code by `tests/spec_vectors.rs`, so the two cannot drift apart.
//!
//! # Layout
//! - [`frame`]: the 16-byte header, limits, and splitting a byte stream into frames.
//! - [`message`]: request and response types and their body encodings.
//! - [`answer`]: the response type of each request, the decline of any request, and the sealed
//!   encode that computes a response MAC over the bytes it writes.
//! - [`crypto`]: card key derivation, request/response cryptograms, offline certificates,
//!   identity assertions.
//! - [`codec`]: a thin tokio-util `Decoder`/`Encoder` adapter (feature `codec`).
//!
//! Nothing here does I/O, reads a clock or draws randomness: callers pass those in.
#![forbid(unsafe_code)]

pub mod answer;
#[cfg(feature = "codec")]
pub mod codec;
pub mod crypto;
pub mod frame;
pub mod message;

pub use answer::{decline, Answer, Seal};
pub use frame::{DecodeError, EncodeError, ErrorCode, Frame, MessageType, RequestId};
pub use message::*;
