//! Card transactions on the shard: purchase, top-up, balance, history, identity, offline
//! records. Each looks up the card and what its chain holds, calls its decision
//! ([`super::decide`]), appends and applies the entry, and seals the answer.

use citycard_protocol::{
    Amount, Answer, CardAuth, CardResult, EntryKind, HistoryEntry, MessageType, OfflineRecord,
    Response, Status,
};

use super::answer::{card_result, history_entry, seal, seal_card_result, unauthenticated};
use super::decide::{self, AtcLookup, Decided};
use super::entry::Numbered;
use super::shard::Shard;
use super::types::{HISTORY_WALK_MAX, OFFLINE_LOOKUP_DEPTH};
use super::StoreError;

impl Shard {
    pub(super) fn money(
        &mut self,
        terminal: &str,
        message_type: MessageType,
        auth: &CardAuth,
        amount: Amount,
        now_ms: u64,
    ) -> Result<Answer, StoreError> {
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
            Err(status) => return Ok(Answer::plain(wrap(unauthenticated(status, auth)))),
        };
        let atc = self.atc_use(&card, auth)?;
        let decided =
            decide::money::decide(&self.context(terminal, now_ms), kind, auth, amount, &card, atc);
        let result = match decided {
            Decided::Decline(result) => {
                tracing::warn!(card = %auth.card_id.masked(), terminal, atc = auth.atc.0, "replayed counter declined");
                result
            }
            Decided::Again(seq, entry) => card_result(&entry, seq),
            Decided::Record(entry) => {
                // The answer is read off the entry before it moves into the journal (no clone
                // on the per-transaction path).
                let mut result = card_result(&entry, 0);
                result.journal_seq = self.journal_entry(entry)?;
                result
            }
        };
        // Sealed as the connection encodes it: the body is written once, MAC included.
        Ok(Answer::sealed(wrap(result), key, auth.cryptogram))
    }

    pub(super) fn balance(
        &mut self,
        terminal: &str,
        auth: &CardAuth,
        _now_ms: u64,
    ) -> Result<Answer, StoreError> {
        let (card, key) = match self.authenticate(terminal, MessageType::Balance, auth, Amount(0)) {
            Ok(found) => found,
            Err(status) => {
                return Ok(Answer::plain(Response::Balance(unauthenticated(status, auth))))
            }
        };
        let result = decide::read::balance(auth, &card);
        Ok(Answer::sealed(Response::Balance(result), key, auth.cryptogram))
    }

    pub(super) fn history(
        &mut self,
        terminal: &str,
        auth: &CardAuth,
        before_seq: u64,
        limit: u16,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let (card, key) = match self.authenticate(terminal, MessageType::History, auth, Amount(0)) {
            Ok(found) => found,
            Err(status) => {
                return Ok(Response::History(decide::read::empty_page(status, auth, Amount(0))))
            }
        };
        let limit = decide::read::history_limit(limit);
        let before = if before_seq == 0 { u64::MAX } else { before_seq };
        let mut entries: Vec<HistoryEntry> = Vec::with_capacity(limit + 1);
        // The card's chain runs newest first, through the overlay and the journal files; one
        // entry past the page says whether it continues.
        // ATCs of purchases reversed later (protocol 1.2): a reversal is always newer than its
        // purchase, and the walk sees every newer record, so the purchase shows Reversed.
        let mut reversed = std::collections::HashSet::new();
        // Entries older than the retention are not answered online (PROTOCOL.md 6.1): the
        // walk stops at the first one, newest first.
        let retention_ms = u64::from(self.limits.history_retention_days) * 86_400_000;
        let cut_ms = now_ms.saturating_sub(retention_ms);
        let mut beyond = false;
        self.walk_card(auth.card_id, HISTORY_WALK_MAX, |seq, entry| {
            if entry.kind == EntryKind::Reversal && entry.status == Status::Approved {
                reversed.insert(entry.transit.ref_atc);
            }
            if seq < before {
                if entry.time_ms < cut_ms {
                    beyond = true;
                    return false;
                }
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
        let page = if beyond && entries.is_empty() {
            decide::read::empty_page(Status::BeyondRetention, auth, card.balance)
        } else {
            decide::read::history_page(auth, &card, entries, limit, beyond)
        };
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
        let (card, key) = match self.authenticate(terminal, MessageType::Identity, auth, Amount(0))
        {
            Ok(found) => found,
            Err(status) => return Ok(Response::Identity(decide::identity::declined(status, auth))),
        };
        let atc = self.atc_use(&card, auth)?;
        let result =
            match decide::identity::decide(&self.context(terminal, now_ms), auth, &card, atc) {
                Decided::Decline(status) => decide::identity::declined(status, auth),
                Decided::Again(seq, entry) => {
                    decide::identity::answer(auth, &entry, seq, &self.secrets.assertion)
                }
                Decided::Record(entry) => {
                    let seq = self.journal_entry(entry.clone())?;
                    decide::identity::answer(auth, &entry, seq, &self.secrets.assertion)
                }
            };
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
        self.offline_record(terminal, record, Numbered::NONE, now_ms)
    }

    /// Decides one offline record. A numbered record (protocol 1.3, `numbered` not NONE) is
    /// journaled with its terminal seq, and when it is refused before reaching the card its
    /// refusal is journaled as a note (`decide::offline::note`); its result is sealed for the
    /// NumberedOfflineResults type.
    pub(super) fn offline_record(
        &mut self,
        terminal: &str,
        record: &OfflineRecord,
        numbered: Numbered,
        now_ms: u64,
    ) -> Result<CardResult, StoreError> {
        let response_type = if numbered == Numbered::NONE {
            MessageType::OfflineResults
        } else {
            MessageType::NumberedOfflineResults
        };
        let declined = |status| decide::offline::declined(status, record);
        let (card, key) = match self.card_and_key(record.card_id) {
            Ok(found) => found,
            Err(status) => return self.noted(terminal, record, numbered, declined(status), now_ms),
        };
        if let Err(status) = decide::auth::offline(&key, terminal, record) {
            tracing::warn!(card = %record.card_id.masked(), terminal, "bad offline certificate");
            return self.noted(terminal, record, numbered, declined(status), now_ms);
        }
        let lookup = if record.atc.0 == 0 {
            // Refused before any walk (see the decision).
            AtcLookup::Unknown
        } else if record.atc > card.last_atc {
            // Above every ATC the card has used: new, no walk needed.
            AtcLookup::Unused
        } else {
            let found = self.atc_entry(record.card_id, record.atc, OFFLINE_LOOKUP_DEPTH)?;
            if found == AtcLookup::Unknown {
                tracing::warn!(card = %record.card_id.masked(), terminal, atc = record.atc.0, "offline record older than the card's chain walk; refused as a replay");
            }
            found
        };
        let context = self.context(terminal, now_ms);
        let result = match decide::offline::decide(&context, record, &card, lookup, numbered) {
            Decided::Decline(result) => self.noted(terminal, record, numbered, result, now_ms)?,
            Decided::Again(_, entry)
                if numbered != Numbered::NONE && entry.numbered.seq != numbered.seq =>
            {
                // The same card record under another seq (or uploaded before without one): it
                // was taken once, so this seq is a replay of it (PROTOCOL.md 6.13).
                let replay = CardResult { balance: card.balance, ..declined(Status::Replay) };
                self.noted(terminal, record, numbered, replay, now_ms)?
            }
            Decided::Again(seq, entry) => card_result(&entry, seq),
            Decided::Record(entry) => {
                let mut result = card_result(&entry, 0);
                result.journal_seq = self.journal_entry(entry)?;
                result
            }
        };
        // Each record of a batch has its own key and binding, so each is sealed here.
        let mut result = result;
        seal_card_result(&key, response_type, &record.certificate, &mut result);
        Ok(result)
    }

    /// A record refused before it reached the card: a numbered one gets its refusal note
    /// journaled (and its seq in the result); a 1.1 record is answered without a record.
    fn noted(
        &mut self,
        terminal: &str,
        record: &OfflineRecord,
        numbered: Numbered,
        mut result: CardResult,
        now_ms: u64,
    ) -> Result<CardResult, StoreError> {
        if numbered != Numbered::NONE {
            let context = self.context(terminal, now_ms);
            let note =
                decide::offline::note(&context, record, numbered, result.status, result.balance);
            result.journal_seq = self.journal_entry(note)?;
        }
        Ok(result)
    }
}
