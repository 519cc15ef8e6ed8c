//! The hotlist: the shard's list of cards terminals must refuse, versioned; each change is
//! recorded in the journal entry that caused it and indexed in sled.

use std::collections::HashSet;

use citycard_protocol::{BlockReason, CardId, HotlistEntry};

use super::entry::{Entry, HotlistChange};
use super::shard::Shard;
use super::state;
use super::types::Output;
use super::StoreError;

impl Shard {
    pub(super) fn hotlist(&mut self, since: u64, max: usize) -> Result<Output, StoreError> {
        let mut entries = Vec::new();
        let mut more = false;
        // Cards whose listing this answer left out: the terminal cannot hold them listed.
        let mut skipped = HashSet::new();
        let start = state::hotlist_key(since.saturating_add(1));
        let end = state::hotlist_key(u64::MAX);
        for item in self.db.range(start..end) {
            let (k, v) = item?;
            if entries.len() == max {
                more = true;
                break;
            }
            let version = state::be_u64(&k[1..]).unwrap_or(0);
            let entry = parse_hotlist(version, &v)?;
            if self.needless(&entry, since, &mut skipped) {
                continue;
            }
            entries.push(entry);
        }
        // Changes still in the overlay may not be in sled yet.
        for p in self.overlay.iter() {
            if p.entry.hotlist_version > since
                && !entries.iter().any(|e| e.version == p.entry.hotlist_version)
            {
                if entries.len() == max {
                    more = true;
                    break;
                }
                if let Some(e) =
                    hotlist_entry_of(&p.entry).filter(|e| !self.needless(e, since, &mut skipped))
                {
                    entries.push(e);
                }
            }
        }
        // A complete answer ends at the shard's version even when its newest changes were
        // compacted away (a prune's anchor keeps only listed cards), so a cursor never goes
        // back and no version is handed out twice.
        let version = match entries.last() {
            Some(last) if more => last.version,
            _ => since.max(self.hotlist_version),
        };
        Ok(Output::Hotlist { version, entries, more })
    }
}

impl Shard {
    /// Compaction at read time (PROTOCOL.md 6.5): a change that cannot alter the list the
    /// terminal ends with is left out. A card not listed now was unlisted by a later change
    /// than any listing of it, which the terminal gets in this answer or a later one, so its
    /// listings are needless. Its unlisting is needless too when the terminal cannot hold it
    /// listed: it starts from nothing, or every listing after its cursor was left out in this
    /// answer. Nothing is removed from storage, so a cursor anywhere reaches the right list.
    fn needless(&self, entry: &HotlistEntry, since: u64, skipped: &mut HashSet<CardId>) -> bool {
        let listed_now = self.cards.get(entry.card_id).is_some_and(|c| c.hotlisted().is_some());
        if listed_now {
            return false;
        }
        if entry.listed {
            skipped.insert(entry.card_id);
            return true;
        }
        since == 0 || skipped.contains(&entry.card_id)
    }
}

pub(super) fn hotlist_entry_of(entry: &Entry) -> Option<HotlistEntry> {
    let (listed, reason) = match entry.hotlist_change {
        HotlistChange::None => return None,
        HotlistChange::Listed(r) => (true, r),
        HotlistChange::Unlisted(r) => (false, r),
    };
    Some(HotlistEntry { card_id: entry.card_id, listed, reason, version: entry.hotlist_version })
}

pub(super) fn parse_hotlist(version: u64, v: &[u8]) -> Result<HotlistEntry, StoreError> {
    if v.len() != 10 {
        return Err(StoreError::MalformedState {
            what: "hotlist entry",
            detail: format!("version {version}"),
        });
    }
    let card_id = CardId(state::be_u64(&v[..8]).unwrap_or(0));
    let reason = BlockReason::from_u8(v[9]).ok_or_else(|| StoreError::MalformedState {
        what: "hotlist entry reason",
        detail: format!("version {version}"),
    })?;
    Ok(HotlistEntry { card_id, listed: v[8] == 1, reason, version })
}
