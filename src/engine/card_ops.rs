//! Card transactions: purchase, top-up, balance, history, identity, offline records.

use citycard_protocol::crypto::{assertion_bytes, CardKey};
use citycard_protocol::{
    Amount, CardAuth, CardId, CardResult, CardState, EntryKind, HistoryEntry, HistoryPage,
    IdentityResult, Mac, MessageType, OfflineRecord, Response, Status, MAX_HISTORY_PAGE,
};

use super::answer::{card_result, history_entry, seal, unauthenticated};
use super::decide::transit::Transit;
use super::entry::{Entry, HotlistChange};
use super::shard::Shard;
use super::state::CardRecord;
use super::types::{HISTORY_WALK_MAX, OFFLINE_LOOKUP_DEPTH};
use super::walk::{AtcLookup, AtcUse};
use super::StoreError;
use crate::journal::Pos;

impl Shard {
    pub(super) fn money(
        &mut self,
        terminal: &str,
        message_type: MessageType,
        auth: &CardAuth,
        amount: Amount,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let kind = if message_type == MessageType::Purchase {
            EntryKind::Purchase
        } else {
            EntryKind::TopUp
        };
        let wrap = |r: CardResult| {
            if kind == EntryKind::Purchase {
                Response::Purchase(r)
            } else {
                Response::TopUp(r)
            }
        };
        let (card, key) = match self.authenticate(terminal, message_type, auth, amount) {
            Ok(found) => found,
            Err(status) => return Ok(wrap(unauthenticated(status, auth))),
        };
        let earlier = match self.atc_use(&card, auth)? {
            AtcUse::Fresh => None,
            AtcUse::Used(seq, e) if e.kind == kind && e.binding == auth.cryptogram => {
                Some(card_result(&e, seq))
            }
            AtcUse::Used(..) | AtcUse::Stale => {
                tracing::warn!(card = %auth.card_id.masked(), terminal, atc = auth.atc.0, "replayed counter declined");
                Some(CardResult { balance: card.balance, ..unauthenticated(Status::Replay, auth) })
            }
        };
        if let Some(result) = earlier {
            return Ok(wrap(self.seal_card(&key, message_type, &auth.cryptogram, result)));
        }
        let status = self.money_status(&card, kind, amount, now_ms);
        let mut after = card;
        if status == Status::Approved {
            after.balance = Amount(if kind == EntryKind::Purchase {
                card.balance.0 - amount.0
            } else {
                card.balance.0 + amount.0
            });
        }
        let (hotlist_version, hotlist_change) = self.next_hotlist(card.hotlisted(), &after);
        let entry = Entry {
            kind,
            status,
            card_id: auth.card_id,
            atc: auth.atc,
            amount: Amount(after.balance.0 - card.balance.0),
            balance_after: after.balance,
            time_ms: now_ms,
            reference: auth.nonce,
            binding: auth.cryptogram,
            other_card: CardId(0),
            key_version: card.key_version,
            hotlist_version,
            hotlist_change,
            extra: amount.0,
            terminal: terminal.to_owned(),
            prev_pos: Pos::NONE,
            transit: Transit::NONE,
        };
        // The answer is read off the entry before it moves into the journal (no clone on the
        // per-transaction path).
        let mut result = card_result(&entry, 0);
        result.journal_seq = self.journal_entry(entry)?;
        Ok(wrap(self.seal_card(&key, message_type, &auth.cryptogram, result)))
    }

    pub(super) fn money_status(
        &self,
        card: &CardRecord,
        kind: EntryKind,
        amount: Amount,
        now_ms: u64,
    ) -> Status {
        if card.retired() {
            return Status::CardClosed;
        }
        if self.key_retired(card, now_ms) {
            return Status::KeyVersionRetired;
        }
        if amount.0 <= 0 || amount.0 > self.limits.max_amount {
            return Status::InvalidAmount;
        }
        match kind {
            EntryKind::Purchase => {
                if card.hotlisted().is_some() {
                    Status::CardBlocked
                } else if super::decide::transit::spendable(card) < amount.0 {
                    // An open tap-in hold is not spendable (protocol 1.2).
                    Status::InsufficientFunds
                } else {
                    Status::Approved
                }
            }
            _ => {
                if card.state == CardState::Blocked {
                    Status::CardBlocked
                } else if card
                    .balance
                    .0
                    .checked_add(amount.0)
                    .is_none_or(|b| b > self.limits.max_balance)
                {
                    Status::OverBalanceCap
                } else {
                    Status::Approved
                }
            }
        }
    }

    pub(super) fn balance(
        &mut self,
        terminal: &str,
        auth: &CardAuth,
        _now_ms: u64,
    ) -> Result<Response, StoreError> {
        let (card, key) = match self.authenticate(terminal, MessageType::Balance, auth, Amount(0)) {
            Ok(found) => found,
            Err(status) => return Ok(Response::Balance(unauthenticated(status, auth))),
        };
        let status = if card.retired() { Status::CardClosed } else { Status::Approved };
        let result = CardResult {
            status,
            card_id: auth.card_id,
            atc: auth.atc,
            balance: card.balance,
            journal_seq: 0,
            mac: Mac::default(),
        };
        Ok(Response::Balance(self.seal_card(&key, MessageType::Balance, &auth.cryptogram, result)))
    }

    pub(super) fn history(
        &mut self,
        terminal: &str,
        auth: &CardAuth,
        before_seq: u64,
        limit: u16,
        _now_ms: u64,
    ) -> Result<Response, StoreError> {
        let empty = |status, balance| HistoryPage {
            status,
            card_id: auth.card_id,
            atc: auth.atc,
            balance,
            entries: Vec::new(),
            next_before_seq: 0,
            mac: Mac::default(),
        };
        let (card, key) = match self.authenticate(terminal, MessageType::History, auth, Amount(0)) {
            Ok(found) => found,
            Err(status) => return Ok(Response::History(empty(status, Amount(0)))),
        };
        let limit = match usize::from(limit) {
            0 => 16,
            n => n.min(MAX_HISTORY_PAGE),
        };
        let before = if before_seq == 0 { u64::MAX } else { before_seq };
        let mut entries: Vec<HistoryEntry> = Vec::with_capacity(limit + 1);
        // ATCs of purchases reversed later (protocol 1.2): a reversal is always newer than its
        // purchase, and the walk sees every newer record, so the purchase shows Reversed.
        let mut reversed = std::collections::HashSet::new();
        // The card's chain runs newest first, through the overlay and the journal files.
        self.walk_card(auth.card_id, HISTORY_WALK_MAX, |seq, entry| {
            if entry.kind == EntryKind::Reversal && entry.status == Status::Approved {
                reversed.insert(entry.transit.ref_atc);
            }
            if seq < before {
                let mut shown = history_entry(entry, seq, auth.card_id);
                if entry.kind == EntryKind::Purchase
                    && entry.status == Status::Approved
                    && reversed.contains(&entry.atc)
                {
                    shown.status = Status::Reversed;
                }
                entries.push(shown);
            }
            entries.len() <= limit
        })?;
        let next_before_seq = if entries.len() > limit {
            entries.truncate(limit);
            entries.last().map_or(0, |e| e.journal_seq)
        } else {
            0
        };
        let mut page = empty(Status::Approved, card.balance);
        page.entries = entries;
        page.next_before_seq = next_before_seq;
        let mut response = Response::History(page);
        seal(&key, &auth.cryptogram, &mut response);
        Ok(response)
    }

    pub(super) fn identity(
        &mut self,
        terminal: &str,
        auth: &CardAuth,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let declined = |status| IdentityResult {
            status,
            card_id: auth.card_id,
            atc: auth.atc,
            journal_seq: 0,
            issued_ms: 0,
            expires_ms: 0,
            signature: [0u8; 64],
            mac: Mac::default(),
        };
        let (card, key) = match self.authenticate(terminal, MessageType::Identity, auth, Amount(0))
        {
            Ok(found) => found,
            Err(status) => return Ok(Response::Identity(declined(status))),
        };
        let (seq, entry) = match self.atc_use(&card, auth)? {
            AtcUse::Used(seq, e)
                if e.kind == EntryKind::Identity && e.binding == auth.cryptogram =>
            {
                (seq, e)
            }
            AtcUse::Used(..) | AtcUse::Stale => {
                let mut response = Response::Identity(declined(Status::Replay));
                seal(&key, &auth.cryptogram, &mut response);
                return Ok(response);
            }
            AtcUse::Fresh => {
                let status = if card.retired() {
                    Status::CardClosed
                } else if self.key_retired(&card, now_ms) {
                    Status::KeyVersionRetired
                } else if card.hotlisted().is_some() {
                    Status::CardBlocked
                } else {
                    Status::Approved
                };
                let entry = Entry {
                    kind: EntryKind::Identity,
                    status,
                    card_id: auth.card_id,
                    atc: auth.atc,
                    amount: Amount(0),
                    balance_after: card.balance,
                    time_ms: now_ms,
                    reference: auth.nonce,
                    binding: auth.cryptogram,
                    other_card: CardId(0),
                    key_version: card.key_version,
                    hotlist_version: 0,
                    hotlist_change: HotlistChange::None,
                    extra: now_ms.saturating_add(self.limits.identity_ttl_ms) as i64,
                    terminal: terminal.to_owned(),
                    prev_pos: Pos::NONE,
                    transit: Transit::NONE,
                };
                (self.journal_entry(entry.clone())?, entry)
            }
        };
        let mut result = declined(entry.status);
        result.journal_seq = seq;
        if entry.status == Status::Approved {
            result.issued_ms = entry.time_ms;
            result.expires_ms = entry.extra as u64;
            let message = assertion_bytes(
                entry.card_id,
                entry.atc,
                seq,
                result.issued_ms,
                result.expires_ms,
                &entry.terminal,
            );
            result.signature.copy_from_slice(self.secrets.assertion.sign(&message).as_ref());
        }
        let mut response = Response::Identity(result);
        seal(&key, &auth.cryptogram, &mut response);
        Ok(response)
    }

    pub(super) fn offline(
        &mut self,
        terminal: &str,
        record: &OfflineRecord,
        now_ms: u64,
    ) -> Result<CardResult, StoreError> {
        let unauth = |status| CardResult {
            status,
            card_id: record.card_id,
            atc: record.atc,
            balance: Amount(0),
            journal_seq: 0,
            mac: Mac::default(),
        };
        let Some(card) = self.cards.get(record.card_id) else {
            return Ok(unauth(Status::UnknownCard));
        };
        let Some(key) = self.card_key(record.card_id, card.key_version) else {
            return Ok(unauth(Status::KeyVersionRetired));
        };
        let expected = key.offline_certificate(
            record.card_id,
            record.atc,
            record.amount,
            record.time_ms,
            record.nonce,
            terminal,
        );
        if !CardKey::verify(&expected, &record.certificate) {
            tracing::warn!(card = %record.card_id.masked(), terminal, "bad offline certificate");
            return Ok(unauth(Status::BadCryptogram));
        }
        if record.atc.0 == 0 {
            // No card produces ATC 0 (it counts from 1), online or offline.
            return Ok(self.seal_card(
                &key,
                MessageType::OfflineBatch,
                &record.certificate,
                CardResult { balance: card.balance, ..unauth(Status::Replay) },
            ));
        }
        let lookup = if record.atc > card.last_atc {
            // Above every ATC the card has used: new, no walk needed.
            AtcLookup::Unused
        } else {
            self.atc_entry(record.card_id, record.atc, OFFLINE_LOOKUP_DEPTH)?
        };
        let result = match lookup {
            AtcLookup::Used(seq, e)
                if e.kind == EntryKind::Offline && e.binding == record.certificate =>
            {
                card_result(&e, seq)
            }
            AtcLookup::Used(..) | AtcLookup::Unknown => {
                if matches!(lookup, AtcLookup::Unknown) {
                    tracing::warn!(card = %record.card_id.masked(), terminal, atc = record.atc.0, "offline record older than the card's chain walk; refused as a replay");
                }
                CardResult { balance: card.balance, ..unauth(Status::Replay) }
            }
            AtcLookup::Unused => {
                let status = if card.retired() {
                    Status::CardClosed
                } else if record.amount.0 <= 0
                    || record.amount.0 > self.limits.max_amount
                    || card.balance.0.checked_sub(record.amount.0).is_none()
                {
                    Status::InvalidAmount
                } else {
                    // Offline spending already happened at the gate: it applies even when it
                    // overdraws or the card was blocked after the reader last synced.
                    Status::Approved
                };
                let mut after = card;
                if status == Status::Approved {
                    after.balance = Amount(card.balance.0 - record.amount.0);
                }
                let (hotlist_version, hotlist_change) = self.next_hotlist(card.hotlisted(), &after);
                let entry = Entry {
                    kind: EntryKind::Offline,
                    status,
                    card_id: record.card_id,
                    atc: record.atc,
                    amount: Amount(after.balance.0 - card.balance.0),
                    balance_after: after.balance,
                    time_ms: record.time_ms,
                    reference: record.nonce,
                    binding: record.certificate,
                    other_card: CardId(0),
                    key_version: card.key_version,
                    hotlist_version,
                    hotlist_change,
                    extra: record.amount.0,
                    terminal: terminal.to_owned(),
                    prev_pos: Pos::NONE,
                    transit: Transit::NONE,
                };
                let _ = now_ms;
                let mut result = card_result(&entry, 0);
                result.journal_seq = self.journal_entry(entry)?;
                result
            }
        };
        Ok(self.seal_card(&key, MessageType::OfflineBatch, &record.certificate, result))
    }
}
