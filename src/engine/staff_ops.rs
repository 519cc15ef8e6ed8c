//! Staff operations on the shard (counter terminals): issue, replace, block, unblock, close.
//! Each looks up the card and what its (terminal, op_ref) already recorded, calls its decision
//! ([`super::decide::staff`]), appends and applies the entry, and seals the answer.

use citycard_protocol::answer::decline_product;
use citycard_protocol::crypto::staff_binding;
use citycard_protocol::{
    Amount, BlockReason, CardId, EntryKind, IssueResult, Mac, Response, Status,
};

use super::answer::{declined_staff, seal, wrap_staff};
use super::decide::{self, Decided};
use super::entry::Entry;
use super::shard::Shard;
use super::StoreError;

impl Shard {
    pub(super) fn issue(
        &mut self,
        terminal: &str,
        op_ref: u64,
        deposit: Amount,
        product: u8,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let prior = self.op_entry(terminal, op_ref)?;
        let new_card = super::card_id_for(self.index, self.count, self.next_card);
        let ctx = self.context(terminal, now_ms);
        let decided = decide::staff::issue(&ctx, op_ref, deposit, product, new_card, prior);
        let (seq, entry) = match decided {
            Decided::Decline(result) => return Ok(Response::Issue(result)),
            Decided::Again(seq, entry) => (seq, entry),
            Decided::Record(entry) => (self.journal_entry(entry.clone())?, entry),
        };
        Ok(Response::Issue(self.issue_result(
            &entry,
            seq,
            entry.card_id,
            CardId(0),
            Amount(entry.balance_after.0),
        )))
    }

    pub(super) fn issue_result(
        &mut self,
        entry: &Entry,
        seq: u64,
        new_card: CardId,
        old_card: CardId,
        balance: Amount,
    ) -> IssueResult {
        let mut result = IssueResult {
            status: entry.status,
            card_id: new_card,
            key_version: entry.key_version,
            card_key: [0u8; 32],
            balance,
            replaced_card_id: old_card,
            journal_seq: seq,
            mac: Mac::default(),
        };
        if entry.status != Status::Approved {
            result.card_id =
                if entry.status == Status::ReferenceReused { CardId(0) } else { new_card };
            result.balance = Amount(0);
            return result;
        }
        let Some(key) = self.card_key(new_card, entry.key_version) else {
            return result;
        };
        result.card_key = *key.bytes();
        let mut response =
            if old_card.0 == 0 { Response::Issue(result) } else { Response::Replace(result) };
        seal(&key, &staff_binding(entry.reference), &mut response);
        match response {
            Response::Issue(r) | Response::Replace(r) => r,
            _ => result,
        }
    }

    pub(super) fn replace(
        &mut self,
        terminal: &str,
        op_ref: u64,
        old: CardId,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let prior = self.op_entry(terminal, op_ref)?;
        let card = self.cards.get(old);
        let new_card = super::card_id_for(self.index, self.count, self.next_card);
        let decided = decide::staff::replace(
            &self.context(terminal, now_ms),
            op_ref,
            old,
            card,
            new_card,
            prior,
        );
        let (seq, entry) = match decided {
            Decided::Decline(result) => return Ok(Response::Replace(result)),
            Decided::Again(seq, entry) => (seq, entry),
            Decided::Record(entry) => (self.journal_entry(entry.clone())?, entry),
        };
        let moved = Amount(entry.amount.0.saturating_neg());
        Ok(Response::Replace(self.issue_result(&entry, seq, entry.other_card, old, moved)))
    }

    pub(super) fn staff(
        &mut self,
        terminal: &str,
        kind: EntryKind,
        op_ref: u64,
        card_id: CardId,
        reason: Option<BlockReason>,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        // The answer is sealed under the card's key. Without it (its issuer key version was
        // removed from issuer.key) nothing is decided or recorded: a zero MAC on an approval
        // would be indistinguishable from a forgery (found by a client written from the spec).
        let card = self.cards.get(card_id);
        if let Some(card) = card {
            if self.card_key(card_id, card.key_version).is_none() {
                tracing::error!(card = %card_id.masked(), key_version = card.key_version.0, "no issuer key for the card's key version; staff operation declined");
                return Ok(wrap_staff(kind, declined_staff(Status::KeyVersionRetired, card_id)));
            }
        }
        let prior = self.op_entry(terminal, op_ref)?;
        let decided = decide::staff::card_op(
            &self.context(terminal, now_ms),
            kind,
            op_ref,
            card_id,
            reason,
            card,
            prior,
        );
        let (seq, entry) = match decided {
            // A reused op_ref or an unknown card: no card key to seal with.
            Decided::Decline(result) => return Ok(wrap_staff(kind, result)),
            Decided::Again(seq, entry) => (seq, entry),
            Decided::Record(entry) => (self.journal_entry(entry.clone())?, entry),
        };
        let mut response = wrap_staff(kind, decide::staff::answer(kind, &entry, seq, card_id));
        if entry.status == Status::ReferenceReused {
            return Ok(response);
        }
        if let Some(card) = self.cards.get(card_id) {
            if let Some(key) = self.card_key(card_id, card.key_version) {
                seal(&key, &staff_binding(op_ref), &mut response);
            }
        }
        Ok(response)
    }

    /// Protocol 1.3: changes a card's product (and its deposit), sealed under the card's key
    /// like block, unblock and close.
    pub(super) fn set_product(
        &mut self,
        terminal: &str,
        op_ref: u64,
        card_id: CardId,
        product: u8,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let card = self.cards.get(card_id);
        if let Some(card) = card {
            if self.card_key(card_id, card.key_version).is_none() {
                tracing::error!(card = %card_id.masked(), key_version = card.key_version.0, "no issuer key for the card's key version; set product declined");
                return Ok(Response::SetProduct(decline_product(
                    Status::KeyVersionRetired,
                    card_id,
                )));
            }
        }
        let prior = self.op_entry(terminal, op_ref)?;
        let ctx = self.context(terminal, now_ms);
        let decided = decide::staff::set_product(&ctx, op_ref, card_id, product, card, prior);
        let (seq, entry) = match decided {
            Decided::Decline(result) => return Ok(Response::SetProduct(result)),
            Decided::Again(seq, entry) => (seq, entry),
            Decided::Record(entry) => (self.journal_entry(entry.clone())?, entry),
        };
        let mut response =
            Response::SetProduct(decide::staff::product_answer(&entry, seq, card_id));
        if let Some(card) = self.cards.get(card_id) {
            if let Some(key) = self.card_key(card_id, card.key_version) {
                seal(&key, &staff_binding(op_ref), &mut response);
            }
        }
        Ok(response)
    }
}
