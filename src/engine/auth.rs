//! Card keys (derived on demand, cached within a bound) and card authentication.

use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Amount, CardAuth, CardId, KeyVersion, MessageType, Status};

use super::shard::Shard;
use super::state::CardRecord;
use super::types::ATC_LOOKUP_DEPTH;
use super::walk::{AtcLookup, AtcUse};
use super::StoreError;
use citycard_protocol::ATC_LATE_WINDOW;

impl Shard {
    pub(super) fn card_key(&mut self, card: CardId, version: KeyVersion) -> Option<CardKey> {
        if let Some(key) = self.keys.get(&(card, version)) {
            return Some(key.clone());
        }
        let master = self.secrets.issuer.get(&version.0)?;
        let key = CardKey::derive(master, version, card);
        if self.keys.len() >= self.limits.key_cache_max {
            // Crude but bounded: a full cache starts over rather than tracking recency.
            self.keys.clear();
        }
        self.keys.insert((card, version), key.clone());
        Some(key)
    }

    /// Checks the card exists and the cryptogram verifies. On failure returns the decline
    /// status (never journaled, never consumes the ATC).
    pub(super) fn authenticate(
        &mut self,
        terminal: &str,
        message_type: MessageType,
        auth: &CardAuth,
        amount: Amount,
    ) -> Result<(CardRecord, CardKey), Status> {
        let Some(card) = self.cards.get(auth.card_id) else {
            return Err(Status::UnknownCard);
        };
        let Some(key) = self.card_key(auth.card_id, card.key_version) else {
            tracing::error!(card = %auth.card_id.masked(), key_version = card.key_version.0, "no issuer key for the card's key version");
            return Err(Status::KeyVersionRetired);
        };
        let expected = key.request_cryptogram(
            message_type as u8,
            auth.card_id,
            auth.atc,
            amount,
            auth.nonce,
            terminal,
        );
        if !CardKey::verify(&expected, &auth.cryptogram) {
            tracing::warn!(card = %auth.card_id.masked(), terminal, "bad cryptogram");
            return Err(Status::BadCryptogram);
        }
        Ok((card, key))
    }

    /// Whether a consuming card request's ATC is new, was used, or is too old (PROTOCOL.md 6.1).
    /// A used ATC is found in the (card, ATC) index whatever its age, so a retry always gets
    /// its original answer. An unused ATC at or below the card's last one is still new within
    /// [`ATC_LATE_WINDOW`]: a request answered Busy or Unavailable was never done, and a later
    /// ATC of the same card may have been decided in the meantime. ATC 0 is never valid (a new
    /// card's last ATC is 0, so its first online ATC is 1).
    pub(super) fn atc_use(
        &mut self,
        card: &CardRecord,
        auth: &CardAuth,
    ) -> Result<AtcUse, StoreError> {
        if auth.atc > card.last_atc {
            return Ok(AtcUse::Fresh);
        }
        match self.atc_entry(auth.card_id, auth.atc, ATC_LOOKUP_DEPTH)? {
            AtcLookup::Used(seq, entry) => Ok(AtcUse::Used(seq, entry)),
            AtcLookup::Unused
                if auth.atc.0 != 0 && card.last_atc.0 - auth.atc.0 < ATC_LATE_WINDOW =>
            {
                Ok(AtcUse::Fresh)
            }
            // Not provably unused (too old, or deeper than the walk goes): never decide it.
            AtcLookup::Unused | AtcLookup::Unknown => Ok(AtcUse::Stale),
        }
    }

    pub(super) fn key_retired(&self, card: &CardRecord, now_ms: u64) -> bool {
        self.secrets
            .retire_after_ms
            .get(&card.key_version.0)
            .is_some_and(|cutoff| now_ms >= *cutoff)
    }
}
