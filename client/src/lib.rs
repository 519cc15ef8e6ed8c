//! citycard-client: what a terminal (card reader, kiosk, staff counter) needs to talk to a
//! citycard server.
//!
//! Mutual TLS 1.3 with rustls (ring provider, ALPN `citycard/1`), requests pipelined over one
//! connection by request id, same-bytes retries with bounded exponential backoff on Busy,
//! Unavailable and lost connections, response MAC checks, and a typed call per operation. The
//! wire format is `citycard-protocol` (see its `PROTOCOL.md`).
//!
//! The card's side (the request cryptogram over card key and ATC) belongs to the card; the
//! [`Card`] helper plays it for tests and development.
//!
//! ```no_run
//! use citycard_client::{Card, Client, Config};
//! use citycard_protocol::{Amount, MessageType, Status};
//!
//! # async fn demo() -> Result<(), citycard_client::ClientError> {
//! let keys = std::path::Path::new("keys");
//! let counter = Client::new(Config::from_keys_dir("127.0.0.1:7700", keys, "counter-1")?)?;
//! let issued = counter.issue(1, Amount(1_000)).await?;
//! assert_eq!(issued.status, Status::Approved);
//! let mut card = Card::from_issue(&issued);
//!
//! let reader = Client::new(Config::from_keys_dir("127.0.0.1:7700", keys, "reader-1")?)?;
//! let auth = card.auth(MessageType::Purchase, Amount(250), reader.terminal_id());
//! let paid = reader.purchase(&auth, Amount(250), Some(card.key())).await?;
//! println!("{}: balance {}", citycard_client::words::status_words(paid.status), paid.balance.0);
//! # Ok(()) }
//! ```
//!
//! Runnable examples per role are in `client/examples/` (`reader`, `kiosk`, `counter`).
//!
//! # Layout
//! - [`config`]: server, TLS identity and the client's limits ([`Config`], [`RetryPolicy`]).
//! - [`client`]: the typed operations, retries, ordering and MAC checks ([`Client`]).
//! - `connection`: one TLS connection with its writer and reader tasks.
//! - [`card`]: a simulated card for tests and development ([`Card`]).
//! - [`error`]: the error type, [`ClientError`].
//! - [`words`]: statuses and codes in words for people.
#![forbid(unsafe_code)]

pub mod card;
pub mod client;
pub mod config;
mod connection;
pub mod error;
mod transit;
pub mod words;

pub use card::Card;
pub use client::Client;
pub use config::{Config, RetryPolicy, ALPN, MAX_IN_FLIGHT};
pub use error::ClientError;

use citycard_protocol::IdentityResult;

/// Checks an identity assertion's Ed25519 signature with the server's public key (the 32
/// bytes of `assertion.pub`) for the terminal that asked, and that it has not expired at
/// `now_ms`.
pub fn verify_identity(
    result: &IdentityResult,
    public_key: &[u8; 32],
    terminal_id: &str,
    now_ms: u64,
) -> bool {
    let message = citycard_protocol::crypto::assertion_bytes(
        result.card_id,
        result.atc,
        result.journal_seq,
        result.issued_ms,
        result.expires_ms,
        terminal_id,
    );
    now_ms < result.expires_ms
        && citycard_protocol::crypto::verify_assertion(public_key, &message, &result.signature)
}
