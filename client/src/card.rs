//! The card's side, for tests, development and demos: a card key and its transaction counter
//! computing request cryptograms and offline certificates.
//!
//! On a real terminal the card computes these itself and the terminal never sees its key; the
//! terminal passes the card's [`CardAuth`] to [`crate::Client`] unchanged.

use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Amount, Atc, CardAuth, CardId, IssueResult, MessageType, OfflineRecord};
use ring::rand::{SecureRandom, SystemRandom};

/// A simulated card: number, key and the ATC of its last transaction.
#[derive(Clone, Debug)]
pub struct Card {
    id: CardId,
    key: CardKey,
    /// The ATC of the card's last consuming transaction; the next one uses `atc + 1`.
    atc: Atc,
}

impl Card {
    pub fn new(id: CardId, key: CardKey, last_atc: Atc) -> Card {
        Card { id, key, atc: last_atc }
    }

    /// The card personalised from an Issue or Replace answer (a fresh card: ATC 0).
    pub fn from_issue(result: &IssueResult) -> Card {
        Card::new(result.card_id, CardKey::from_bytes(result.card_key), Atc(0))
    }

    pub fn id(&self) -> CardId {
        self.id
    }

    pub fn key(&self) -> &CardKey {
        &self.key
    }

    /// The ATC of the last transaction.
    pub fn atc(&self) -> Atc {
        self.atc
    }

    /// Authentication for a consuming request (Purchase, TopUp, Identity): the card counts up
    /// first, as a card does. Keep the result to retry: a retry must reuse it, never a new ATC.
    pub fn auth(
        &mut self,
        message_type: MessageType,
        amount: Amount,
        terminal_id: &str,
    ) -> CardAuth {
        self.atc = Atc(self.atc.0.wrapping_add(1));
        self.auth_at(message_type, amount, terminal_id, self.atc)
    }

    /// Authentication for a read (Balance, History): reads do not consume the ATC, so the
    /// counter stays where it is.
    pub fn read_auth(&self, message_type: MessageType, terminal_id: &str) -> CardAuth {
        self.auth_at(message_type, Amount(0), terminal_id, Atc(self.atc.0.wrapping_add(1)))
    }

    fn auth_at(
        &self,
        message_type: MessageType,
        amount: Amount,
        terminal_id: &str,
        atc: Atc,
    ) -> CardAuth {
        let nonce = fresh_nonce(atc);
        let cryptogram = self.key.request_cryptogram(
            message_type as u8,
            self.id,
            atc,
            amount,
            nonce,
            terminal_id,
        );
        CardAuth { card_id: self.id, atc, nonce, cryptogram }
    }

    /// An offline purchase record as the card produces it for a reader without a connection.
    pub fn offline(&mut self, amount: Amount, time_ms: u64, terminal_id: &str) -> OfflineRecord {
        self.atc = Atc(self.atc.0.wrapping_add(1));
        let nonce = fresh_nonce(self.atc);
        let certificate =
            self.key.offline_certificate(self.id, self.atc, amount, time_ms, nonce, terminal_id);
        OfflineRecord { card_id: self.id, atc: self.atc, amount, time_ms, nonce, certificate }
    }
}

/// A random nonce. Should the system generator fail, the ATC (unique per card transaction and
/// covered by the cryptogram anyway) stands in, so the card still works.
fn fresh_nonce(atc: Atc) -> u64 {
    let mut bytes = [0u8; 8];
    match SystemRandom::new().fill(&mut bytes) {
        Ok(()) => u64::from_be_bytes(bytes),
        Err(_) => u64::from(atc.0),
    }
}
