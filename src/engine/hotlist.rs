//! The hotlist: the shard's list of cards terminals must refuse, versioned; each change is
//! recorded in the journal entry that caused it and indexed in sled.

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
        let start = state::hotlist_key(since.saturating_add(1));
        let end = state::hotlist_key(u64::MAX);
        for item in self.db.range(start..end) {
            let (k, v) = item?;
            if entries.len() == max {
                more = true;
                break;
            }
            let version = state::be_u64(&k[1..]).unwrap_or(0);
            entries.push(parse_hotlist(version, &v)?);
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
                if let Some(e) = hotlist_entry_of(&p.entry) {
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
