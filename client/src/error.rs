//! The client's one error type: what went wrong between a call and a trustworthy answer.
//!
//! A declined transaction is not an error: it comes back as the answer with its status (see
//! [`crate::words`] for the words). Errors are for answers the client could not get or must
//! not believe.

use std::path::PathBuf;

use citycard_protocol::{DecodeError, EncodeError, MessageType};

/// Errors of [`crate::Client`] calls and of building a [`crate::Config`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A key or certificate file could not be read or parsed.
    #[error("{path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    /// rustls refused the configuration or the handshake.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// A configuration value is out of its range.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// TCP connect or TLS handshake failed (retried with backoff).
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    /// Connect and handshake did not finish within `connect_timeout_ms`.
    #[error("connecting to {addr}: no handshake within {timeout_ms} ms")]
    ConnectTimeout { addr: String, timeout_ms: u64 },
    /// The server did not agree to ALPN `citycard/1`.
    #[error("the server did not negotiate ALPN citycard/1")]
    Alpn,
    /// The connection ended before the answer arrived (retried on a new connection).
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// No answer within `request_timeout_ms` (the connection is dropped and the same request
    /// retried on a new one).
    #[error("no answer within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    /// The server answered with an Error frame (protocol section 5.1).
    #[error("server error {code} ({name}): {message}")]
    Server { code: u16, name: &'static str, message: String },
    /// The answer's bytes were not a valid frame or body: the server (or the path) is broken.
    #[error("undecodable answer: {0}")]
    Decode(#[from] DecodeError),
    /// The request could not be encoded (a count above its limit, ...): a caller bug.
    #[error("request not encodable: {0}")]
    Encode(#[from] EncodeError),
    /// The answer has another type than the request asks for.
    #[error("answer of type {got:#04x} to a {expected:?} request")]
    UnexpectedType { expected: MessageType, got: u8 },
    /// The response MAC did not verify under the card key: the answer must not be believed.
    #[error("response MAC does not verify ({0:?} answer)")]
    BadMac(MessageType),
    /// The answer names another card, ATC or record count than the request.
    #[error("answer does not match the request: {0}")]
    Mismatch(&'static str),
    /// Every attempt failed; `last` is the last attempt's error.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: Box<ClientError> },
}

impl ClientError {
    /// Errors after which the same request is sent again (on a new connection): the outcome is
    /// unknown or nothing was done, and the protocol makes a same-bytes retry safe (6.1, 6.2).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::ConnectTimeout { .. }
            | ClientError::ConnectionLost(_)
            | ClientError::Timeout { .. } => true,
            // TooManyConnections, Internal, ShuttingDown: try again on a new connection.
            ClientError::Server { code, .. } => matches!(code, 10 | 12 | 13),
            _ => false,
        }
    }
}
