//! Balance and history: answers that read the card and journal nothing.

use citycard_protocol::{
    Amount, CardAuth, CardResult, HistoryEntry, HistoryPage, Mac, Status, MAX_HISTORY_PAGE,
};

use crate::engine::state::CardRecord;

/// The balance answer for an authenticated card (before its MAC).
pub fn balance(auth: &CardAuth, card: &CardRecord) -> CardResult {
    let status = if card.retired() { Status::CardClosed } else { Status::Approved };
    CardResult {
        status,
        card_id: auth.card_id,
        atc: auth.atc,
        balance: card.balance,
        journal_seq: 0,
        mac: Mac::default(),
    }
}

/// How many entries a history page holds for the requested `limit` (0: the default of 16).
pub fn history_limit(limit: u16) -> usize {
    match usize::from(limit) {
        0 => 16,
        n => n.min(MAX_HISTORY_PAGE),
    }
}

/// The history page without entries (a decline, or the start of a page).
pub fn empty_page(status: Status, auth: &CardAuth, balance: Amount) -> HistoryPage {
    HistoryPage { balance, ..citycard_protocol::answer::decline_history(status, auth) }
}

/// The page answered from `entries`, the card's records below the requested seq, newest
/// first: at most `limit` of them; one more than `limit` means the page continues below.
pub fn history_page(
    auth: &CardAuth,
    card: &CardRecord,
    mut entries: Vec<HistoryEntry>,
    limit: usize,
    beyond_retention: bool,
) -> HistoryPage {
    // Older entries exist past the retention: the next page asks for them and is answered
    // BeyondRetention, so the terminal learns they exist instead of seeing the history end.
    let next_before_seq = if entries.len() > limit || beyond_retention {
        entries.truncate(limit);
        entries.last().map_or(0, |e| e.journal_seq)
    } else {
        0
    };
    let mut page = empty_page(Status::Approved, auth, card.balance);
    page.entries = entries;
    page.next_before_seq = next_before_seq;
    page
}
