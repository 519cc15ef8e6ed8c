//! Card keys (derived on demand, cached within a bound), card lookup with authentication, and
//! the ATC lookup that feeds the exactly-once rules.

use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Amount, CardAuth, CardId, KeyVersion, MessageType, Status};

use super::decide::{self, AtcUse, Context, Policy};
use super::shard::Shard;
use super::state::CardRecord;
use super::types::ATC_LOOKUP_DEPTH;
use super::StoreError;

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

    /// The card's record and key, if it exists and its key is available. On failure returns
    /// the decline status (never journaled, never consumes the ATC).
    pub(super) fn card_and_key(
        &mut self,
        card_id: CardId,
    ) -> Result<(CardRecord, CardKey), Status> {
        let Some(card) = self.cards.get(card_id) else {
            return Err(Status::UnknownCard);
        };
        let Some(key) = self.card_key(card_id, card.key_version) else {
            tracing::error!(card = %card_id.masked(), key_version = card.key_version.0, "no issuer key for the card's key version");
            return Err(Status::KeyVersionRetired);
        };
        Ok((card, key))
    }

    /// Looks the card up and checks the request's cryptogram ([`decide::auth::request`]).
    pub(super) fn authenticate(
        &mut self,
        terminal: &str,
        message_type: MessageType,
        auth: &CardAuth,
        amount: Amount,
    ) -> Result<(CardRecord, CardKey), Status> {
        let (card, key) = self.card_and_key(auth.card_id)?;
        if let Err(status) = decide::auth::request(&key, terminal, message_type, auth, amount) {
            tracing::warn!(card = %auth.card_id.masked(), terminal, "bad cryptogram");
            return Err(status);
        }
        Ok((card, key))
    }

    /// What the card's chain says about the request's ATC ([`decide::atc_use`]); walks the
    /// chain only for an ATC at or below the card's last one.
    pub(super) fn atc_use(
        &mut self,
        card: &CardRecord,
        auth: &CardAuth,
    ) -> Result<AtcUse, StoreError> {
        let lookup = if auth.atc > card.last_atc {
            None
        } else {
            Some(self.atc_entry(auth.card_id, auth.atc, ATC_LOOKUP_DEPTH)?)
        };
        Ok(decide::atc_use(card, auth.atc, lookup))
    }

    /// The moment of a decision: terminal, time, limits, key policy, hotlist version.
    pub(super) fn context<'a>(&'a self, terminal: &'a str, now_ms: u64) -> Context<'a> {
        Context {
            terminal,
            now_ms,
            policy: Policy {
                limits: &self.limits,
                retire_after_ms: &self.secrets.retire_after_ms,
                current_version: self.secrets.current_version,
            },
            hotlist_version: self.hotlist_version,
        }
    }
}
