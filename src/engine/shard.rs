//! One shard: its journal (the truth), its sled database (derived state), its cards, and the
//! call pattern every driver follows.
//!
//! The call pattern is: [`Shard::execute`] for each command of a batch (decisions see the
//! effects of earlier commands in the same batch), then [`Shard::commit`] (one journal sync),
//! then send the replies, then [`Shard::persist_due`] with the driver's time. sled is written
//! behind (see [`super::persister`]), in large
//! coalesced batches: committed entries stay in an in-memory overlay that every read consults
//! until sled has confirmed them. Nothing decided is visible to anyone before `commit` returns
//! Ok.
//!
//! The rest of `impl Shard` lives beside this file, one idea per file: `open` (recovery),
//! `persist` (the write-behind), `apply`, `walk` (card chains), `hotlist`, `auth`, and the
//! operations (`card_ops`, `staff_ops`), which do lookup, decide ([`super::decide`]), append,
//! apply, and nothing else.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Answer, CardId, EntryKind, KeyVersion, Request};

use super::cards::Cards;
use super::checkpoint::CheckpointPolicy;
use super::overlay::Overlay;
use super::persister::{CheckpointPlace, WriteBehind};
use super::state::CardRecord;
use super::transit_ops::TransitOp;
use super::types::{Limits, Op, Output, Secrets};
use super::StoreError;
use crate::journal::{Journal, JournalFiles};

/// One shard: journal, derived state, cards, and the decisions over them. Owned by one thread.
pub struct Shard {
    pub(super) index: u16,
    pub(super) count: u16,
    pub(super) limits: Limits,
    pub(super) secrets: Arc<Secrets>,
    /// None only while recovery replays into a shard being opened.
    pub(super) journal: Option<Journal>,
    pub(super) db: sled::Db,
    pub(super) cards: Cards,
    pub(super) keys: HashMap<(CardId, KeyVersion), CardKey>,
    pub(super) hotlist_version: u64,
    /// Allocation counter of the next card id this shard issues.
    pub(super) next_card: u64,
    /// Highest seq handed to sled (the write-behind may still be writing it).
    pub(super) applied_seq: u64,
    pub(super) overlay: Overlay,
    /// Runs the sealed chunks against sled (see [`super::persister`]).
    pub(super) write_behind: Box<dyn WriteBehind>,
    /// Highest seq sled has confirmed (the overlay holds everything above it).
    pub(super) persisted: u64,
    /// The sled directory, for error messages.
    pub(super) state_dir: PathBuf,
    pub(super) scratch: Vec<u8>,
    pub(super) place: CheckpointPlace,
    /// Reads committed records by position (history pages, retries, staff op lookups).
    pub(super) files: JournalFiles,
    pub(super) checkpoint_policy: CheckpointPolicy,
    /// Seq of the last checkpoint handed to the write-behind.
    pub(super) checkpoint_seq: u64,
    /// The driver's time of that checkpoint (None until a time is known: the first chunk
    /// then starts the interval).
    pub(super) checkpoint_at_ms: Option<u64>,
    /// The latest time the driver passed in (Unix ms; 0 before the first): the engine reads no
    /// clock of its own.
    pub(super) now_ms: u64,
    /// Open holds by expiry, for the sweep (derived from the card records).
    pub(super) hold_index: super::holds::HoldIndex,
}

impl Shard {
    /// Takes the driver's time. A clock that steps back does not move the shard's time back
    /// (chunk ages and checkpoint intervals only grow).
    pub(super) fn observe(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    /// Installs new key material (issuer key rotation). Cached card keys stay valid: a card's
    /// key depends only on its own key version, which never changes.
    pub fn replace_secrets(&mut self, secrets: Arc<Secrets>) {
        self.secrets = secrets;
    }

    pub fn hotlist_version(&self) -> u64 {
        self.hotlist_version
    }

    /// A card's current record (tests and the auditor).
    pub fn card(&self, id: CardId) -> Option<CardRecord> {
        self.cards.get(id)
    }

    /// Every card, in id order (tests and tools: reads the whole card table).
    pub fn cards(&self) -> Result<Vec<(CardId, CardRecord)>, StoreError> {
        self.cards.all()
    }

    /// How many cards the shard holds.
    pub fn card_count(&self) -> usize {
        self.cards.len()
    }

    /// How many of them are in memory now.
    pub fn cards_in_memory(&self) -> usize {
        self.cards.cached()
    }

    /// Records decided but not yet committed.
    pub fn pending(&self) -> usize {
        self.journal.as_ref().map_or(0, Journal::pending)
    }

    /// The records decided but not yet committed, encoded as the journal will write them
    /// (see [`Journal::pending_bytes`]).
    pub fn pending_bytes(&self) -> &[u8] {
        self.journal.as_ref().map_or(&[], Journal::pending_bytes)
    }

    pub(super) fn journal(&mut self) -> Result<&mut Journal, StoreError> {
        self.journal.as_mut().ok_or(StoreError::JournalNotOpen)
    }

    /// Makes every decided record durable with one sync. Err is fail-stop.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        self.journal()?.commit()?;
        Ok(())
    }

    /// Decides `op`, journals the outcome (in memory until `commit`), and returns the answer.
    pub fn execute(
        &mut self,
        terminal: &str,
        op: Op<'_>,
        now_ms: u64,
    ) -> Result<Output, StoreError> {
        self.observe(now_ms);
        match op {
            Op::Request(request) => self.request(terminal, request, now_ms).map(Output::Response),
            Op::Offline(records) => {
                let mut results = Vec::with_capacity(records.len());
                for (position, record) in records {
                    results.push((*position, self.offline(terminal, record, now_ms)?));
                }
                Ok(Output::Offline(results))
            }
            Op::Hotlist { since, max } => self.hotlist(since, max),
            Op::Numbered(records) => self.numbered_batch(terminal, records, now_ms),
            Op::SeqLookup(seqs) => self.seq_lookup(terminal, seqs),
        }
        .and_then(|output| {
            // A card read that failed inside the operation stops the shard before its outcome
            // is committed or answered.
            self.cards.check()?;
            Ok(output)
        })
    }

    fn request(
        &mut self,
        terminal: &str,
        request: &Request,
        now_ms: u64,
    ) -> Result<Answer, StoreError> {
        // A hold whose timeout the clock has passed is settled when its card is next touched
        // (the worker's sweep settles the others); Close and Replace settle an open hold first.
        let touched = match request {
            Request::Block { card_id, .. }
            | Request::Unblock { card_id, .. }
            | Request::Close { card_id, .. }
            | Request::Replace { card_id, .. }
            | Request::SetProduct { card_id, .. } => Some(*card_id),
            other => other.card_auth().map(|a| a.card_id),
        };
        if let Some(card) = touched {
            // Only a Close or Replace that will be decided ends the ride: a retry of one
            // (its op_ref already answered) or a reused op_ref executes nothing.
            let force = match request {
                Request::Close { op_ref, .. } | Request::Replace { op_ref, .. } => {
                    self.op_entry(terminal, *op_ref)?.is_none()
                }
                _ => false,
            };
            self.settle_hold(card, now_ms, force)?;
        }
        let response = match request {
            Request::Purchase { auth, amount } => {
                return self.money(terminal, request.message_type(), auth, *amount, now_ms)
            }
            Request::TopUp { auth, amount } => {
                return self.money(terminal, request.message_type(), auth, *amount, now_ms)
            }
            Request::Balance { auth } => return self.balance(terminal, auth, now_ms),
            Request::History { auth, before_seq, limit } => {
                self.history(terminal, auth, *before_seq, *limit, now_ms)
            }
            Request::Identity { auth } => self.identity(terminal, auth, now_ms),
            Request::Issue { op_ref, deposit } => {
                self.issue(terminal, *op_ref, *deposit, 0, now_ms)
            }
            Request::IssueProduct { op_ref, deposit, product } => {
                self.issue(terminal, *op_ref, *deposit, *product, now_ms)
            }
            Request::SetProduct { op_ref, card_id, product } => {
                self.set_product(terminal, *op_ref, *card_id, *product, now_ms)
            }
            Request::Block { op_ref, card_id, reason } => {
                self.staff(terminal, EntryKind::Block, *op_ref, *card_id, Some(*reason), now_ms)
            }
            Request::Unblock { op_ref, card_id } => {
                self.staff(terminal, EntryKind::Unblock, *op_ref, *card_id, None, now_ms)
            }
            Request::Close { op_ref, card_id } => {
                self.staff(terminal, EntryKind::Close, *op_ref, *card_id, None, now_ms)
            }
            Request::Replace { op_ref, card_id } => {
                self.replace(terminal, *op_ref, *card_id, now_ms)
            }
            Request::TapIn { auth } => self.transit_op(terminal, TransitOp::TapIn, auth, now_ms),
            Request::TapOut { auth, fare } => {
                self.transit_op(terminal, TransitOp::TapOut { fare: *fare }, auth, now_ms)
            }
            Request::Reversal { auth, amount, original_atc, original_cryptogram } => {
                let op = TransitOp::Reversal {
                    amount: *amount,
                    original_atc: *original_atc,
                    original_cryptogram: *original_cryptogram,
                };
                self.transit_op(terminal, op, auth, now_ms)
            }
            Request::Inquiry { auth, original_type, amount } => {
                self.inquiry(terminal, auth, *original_type, *amount, now_ms)
            }
            Request::Funds { auth } => self.funds(terminal, auth),
            Request::FundsProduct { auth } => self.funds_product(terminal, auth, now_ms),
            Request::Hello { .. }
            | Request::OfflineBatch { .. }
            | Request::NumberedOfflineBatch { .. }
            | Request::HotlistSync { .. } => Err(StoreError::NotForShard(request.message_type())),
        };
        // These answers are sealed as values (each decision seals its own); the card
        // transactions above hand their seal to the connection's one-pass encode.
        response.map(Answer::plain)
    }
}
