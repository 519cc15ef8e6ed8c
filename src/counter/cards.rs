//! Development card simulator for the counter: derives a card's key from the issuer master
//! keys (`issuer.key`) and finds its transaction counter, so the console can produce the
//! cryptograms a real card would. DEVELOPMENT ONLY: a production counter gets cryptograms from
//! the card in its reader and never holds issuer keys.

use std::path::Path;

use citycard_client::{Card, Client, ClientError};
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Atc, CardId, HistoryPage, KeyVersion, MessageType, Status};

use crate::keys::{IssuerKeys, KeysError};

/// History pages read to find a card's last ATC (64 entries each): bounds the work of one
/// console operation; a card with more than 1,024 journaled operations since its newest
/// higher-ATC entry is beyond what this simulator is for.
pub const MAX_SCAN_PAGES: usize = 16;

/// A card found by the simulator: the card (key and last ATC) and its newest history page.
pub struct FoundCard {
    pub card: Card,
    pub newest: HistoryPage,
}

pub struct DevCards {
    issuer: IssuerKeys,
    /// Serialises simulated card transactions: two staff topping up one card at the same
    /// moment would otherwise compute the same next ATC. Console traffic is a few requests a
    /// minute, so one lock for all cards costs nothing.
    turn: tokio::sync::Mutex<()>,
}

impl DevCards {
    pub fn load(path: &Path) -> Result<DevCards, KeysError> {
        Ok(DevCards { issuer: IssuerKeys::load(path)?, turn: tokio::sync::Mutex::new(()) })
    }

    /// Waits for the simulator's turn (hold it across find + transaction).
    pub async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turn.lock().await
    }

    /// Reads the card (History, which a counter may send) under each issuer key version,
    /// newest first, until the cryptogram verifies; then scans its history for the highest
    /// ATC used. `Ok(Err(page))` is a decline (unknown card, ...) to show as it is.
    pub async fn find(
        &self,
        client: &Client,
        card_id: CardId,
    ) -> Result<Result<FoundCard, HistoryPage>, ClientError> {
        let versions: Vec<u16> = self.issuer.versions().collect();
        let mut last_decline = None;
        for version in versions.into_iter().rev() {
            let Some(master) = self.issuer.key(version) else { continue };
            let key = CardKey::derive(master, KeyVersion(version), card_id);
            let card = Card::new(card_id, key, Atc(0));
            let auth = card.read_auth(MessageType::History, client.terminal_id());
            let page = client.history(&auth, 0, 64, Some(card.key())).await?;
            match page.status {
                Status::Approved => return self.scan(client, card, page).await.map(Ok),
                // Another key version may be the card's: try it.
                Status::BadCryptogram | Status::KeyVersionRetired => last_decline = Some(page),
                _ => return Ok(Err(page)),
            }
        }
        match last_decline {
            Some(page) => Ok(Err(page)),
            None => Err(ClientError::Config("issuer.key holds no key version".into())),
        }
    }

    async fn scan(
        &self,
        client: &Client,
        card: Card,
        newest: HistoryPage,
    ) -> Result<FoundCard, ClientError> {
        let mut atc = newest.entries.iter().map(|e| e.atc.0).max().unwrap_or(0);
        let mut before = newest.next_before_seq;
        for _ in 1..MAX_SCAN_PAGES {
            if before == 0 {
                break;
            }
            let auth = card.read_auth(MessageType::History, client.terminal_id());
            let page = client.history(&auth, before, 64, Some(card.key())).await?;
            if page.status != Status::Approved {
                break;
            }
            atc = atc.max(page.entries.iter().map(|e| e.atc.0).max().unwrap_or(0));
            before = page.next_before_seq;
        }
        Ok(FoundCard { card: Card::new(card.id(), card.key().clone(), Atc(atc)), newest })
    }
}
