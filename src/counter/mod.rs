//! The counter console: staff operations (issue, top-up, balance, history, block, unblock,
//! replace, close) for a counter terminal, as a web page on loopback and as CLI subcommands.
//!
//! The console holds the counter's certificate and talks to the server through
//! `citycard-client`. Staff operations need only the counter's identity and an op_ref; top-up,
//! balance and history are card requests that need the card's own cryptogram (PROTOCOL.md 6.1,
//! and a counter may not send Balance at all, so the balance is read with History). Without a
//! card reader attached, [`cards::DevCards`] plays the card from the issuer master keys:
//! development only.
//!
//! # Layout
//! - [`cli`]: the `citycard counter` arguments and the script subcommands.
//! - [`ops`]: the operations and their answers in words (shared by page and CLI).
//! - [`cards`]: the development card simulator.
//! - [`web`]: the loopback web page.

pub mod cards;
pub mod cli;
pub mod ops;
pub mod web;
