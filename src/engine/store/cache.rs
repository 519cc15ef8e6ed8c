//! The bounded card cache: the cards a shard touched recently, in front of sled's card table,
//! evicted by the CLOCK rule (a second chance for every card used since the hand last passed).
//!
//! A card changed by a journal record that sled has not applied yet is pinned: evicting it
//! would make the next read return sled's older record. Such a card carries the seq of its last
//! change and becomes evictable once the persister reports that seq applied. Pinned cards are
//! bounded by the persist queue (at most a few chunks of changes), so the cache can exceed its
//! capacity only by that much, and only while sled is behind.

use std::collections::HashMap;

use citycard_protocol::CardId;

use crate::engine::state::CardRecord;

struct Slot {
    id: CardId,
    record: CardRecord,
    /// Seq of the journal record that last changed the card; 0 when the card is as sled has it.
    changed_seq: u64,
    /// Used since the clock hand last passed.
    referenced: bool,
}

pub(crate) struct CardCache {
    slots: Vec<Slot>,
    index: HashMap<CardId, u32>,
    hand: usize,
    capacity: usize,
}

impl CardCache {
    pub(crate) fn new(capacity: usize) -> CardCache {
        // At least one slot, so an insert always has somewhere to go; the capacity also fits
        // the u32 index (the config refuses more, see Config::card_cache_entries).
        let capacity = capacity.clamp(1, u32::MAX as usize);
        CardCache { slots: Vec::new(), index: HashMap::new(), hand: 0, capacity }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn get(&mut self, id: CardId) -> Option<CardRecord> {
        let slot = &mut self.slots[*self.index.get(&id)? as usize];
        slot.referenced = true;
        Some(slot.record)
    }

    /// Looks without marking the card used (for reads that are not the card's own traffic).
    pub(crate) fn peek(&self, id: CardId) -> Option<CardRecord> {
        self.index.get(&id).map(|i| self.slots[*i as usize].record)
    }

    /// A cached card and whether it is pinned (changed by a record sled has not applied).
    pub(crate) fn peek_state(&self, id: CardId, persisted: u64) -> Option<(CardRecord, bool)> {
        self.index.get(&id).map(|i| {
            let slot = &self.slots[*i as usize];
            (slot.record, slot.changed_seq > persisted)
        })
    }

    /// Cards changed by records sled has not applied (`changed_seq > persisted`).
    pub(crate) fn pinned(&self, persisted: u64) -> impl Iterator<Item = (CardId, CardRecord)> + '_ {
        self.slots.iter().filter(move |s| s.changed_seq > persisted).map(|s| (s.id, s.record))
    }

    /// Puts a card in the cache: as read from sled (`changed_seq` 0) or as changed by the
    /// journal record `changed_seq`. Evicts an unpinned card when full.
    pub(crate) fn put(&mut self, id: CardId, record: CardRecord, changed_seq: u64, persisted: u64) {
        if let Some(&i) = self.index.get(&id) {
            let slot = &mut self.slots[i as usize];
            slot.record = record;
            slot.changed_seq = slot.changed_seq.max(changed_seq);
            slot.referenced = true;
            return;
        }
        let slot = Slot { id, record, changed_seq, referenced: true };
        if self.slots.len() < self.capacity {
            self.index.insert(id, self.slots.len() as u32);
            self.slots.push(slot);
            return;
        }
        match self.victim(persisted) {
            Some(i) => {
                self.index.remove(&self.slots[i].id);
                self.index.insert(id, i as u32);
                self.slots[i] = slot;
            }
            None => {
                // Every card is pinned or was just used twice round: grow past the capacity
                // (bounded by the unpersisted changes, see the module docs).
                self.index.insert(id, self.slots.len() as u32);
                self.slots.push(slot);
            }
        }
    }

    /// The slot to reuse: the first unpinned card the hand finds unreferenced, clearing the
    /// references it passes. Two turns at most.
    fn victim(&mut self, persisted: u64) -> Option<usize> {
        let n = self.slots.len();
        for _ in 0..2 * n {
            let i = self.hand % n;
            self.hand = (i + 1) % n;
            let slot = &mut self.slots[i];
            if slot.changed_seq > persisted {
                continue;
            }
            slot.changed_seq = 0;
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            return Some(i);
        }
        None
    }

    /// Shrinks back to the capacity after it grew past it (pinned cards now persisted).
    pub(crate) fn trim(&mut self, persisted: u64) {
        while self.slots.len() > self.capacity {
            let last = self.slots.len() - 1;
            if self.slots[last].changed_seq > persisted {
                return;
            }
            let slot = self.slots.swap_remove(last);
            self.index.remove(&slot.id);
        }
    }

    /// Forgets every card (tests: sled changed behind the cache).
    #[cfg(test)]
    pub(crate) fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
        self.hand = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn record(balance: i64) -> CardRecord {
        CardRecord::test_active(balance, 1, crate::journal::Pos { segment: 1, offset: 32 })
    }

    #[test]
    fn stays_within_capacity_and_keeps_used_cards() {
        let mut cache = CardCache::new(4);
        for i in 0..4 {
            cache.put(CardId(i), record(i as i64), 0, 0);
        }
        // The hand clears every reference on its first turn and takes card 0; card 1 is used
        // again before the next eviction, so card 2 goes next.
        cache.put(CardId(10), record(10), 0, 0);
        assert_eq!(cache.len(), 4);
        assert_eq!(cache.peek(CardId(0)), None);
        assert_eq!(cache.get(CardId(1)), Some(record(1)));
        cache.put(CardId(11), record(11), 0, 0);
        assert_eq!(cache.len(), 4);
        assert_eq!(cache.peek(CardId(1)), Some(record(1)));
        assert_eq!(cache.peek(CardId(2)), None);
    }

    #[test]
    fn unpersisted_changes_are_never_evicted() {
        let mut cache = CardCache::new(2);
        cache.put(CardId(1), record(1), 100, 0);
        cache.put(CardId(2), record(2), 101, 0);
        // Both pinned: the cache grows instead of dropping a change sled does not hold.
        cache.put(CardId(3), record(3), 0, 99);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.peek(CardId(1)), Some(record(1)));
        assert_eq!(cache.pinned(100).map(|(id, _)| id).collect::<Vec<_>>(), vec![CardId(2)]);
        // Once sled holds seq 101 everything is evictable and the cache shrinks back.
        cache.trim(101);
        assert_eq!(cache.len(), 2);
        cache.put(CardId(4), record(4), 0, 101);
        assert_eq!(cache.len(), 2);
    }
}
