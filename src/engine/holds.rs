//! The index of open holds by expiry: lets the worker's sweep find the holds its clock has
//! passed without looking at every card. Derived from the card records (built at open, kept
//! current by apply), never stored.

use std::collections::BTreeSet;

use citycard_protocol::CardId;

use super::decide::transit::Hold;
use super::state::CardRecord;

#[derive(Debug, Default)]
pub struct HoldIndex {
    by_expiry: BTreeSet<(u64, CardId)>,
}

impl HoldIndex {
    /// The index of every open hold among `cards`.
    pub fn of<'a>(cards: impl Iterator<Item = (&'a CardId, &'a CardRecord)>) -> HoldIndex {
        let mut index = HoldIndex::default();
        for (id, card) in cards {
            index.change(*id, Hold::NONE, card.hold);
        }
        index
    }

    /// Records that `card`'s hold went from `before` to `after`.
    pub fn change(&mut self, card: CardId, before: Hold, after: Hold) {
        if before == after {
            return;
        }
        if before.is_open() {
            self.by_expiry.remove(&(before.expires_ms, card));
        }
        if after.is_open() {
            self.by_expiry.insert((after.expires_ms, card));
        }
    }

    /// Up to `max` cards whose hold has expired at `now_ms`, oldest first.
    pub fn due(&self, now_ms: u64, max: usize) -> Vec<CardId> {
        self.by_expiry.iter().take_while(|(t, _)| *t <= now_ms).take(max).map(|(_, c)| *c).collect()
    }

    pub fn len(&self) -> usize {
        self.by_expiry.len()
    }
}

#[cfg(test)]
mod tests {
    use citycard_protocol::{Amount, Atc};

    use super::*;

    #[test]
    fn due_follows_changes() {
        let h = |atc, expires_ms| Hold { atc: Atc(atc), amount: Amount(400), expires_ms };
        let mut index = HoldIndex::default();
        index.change(CardId(1), Hold::NONE, h(3, 100));
        index.change(CardId(2), Hold::NONE, h(4, 50));
        assert_eq!(index.due(49, 10), Vec::<CardId>::new());
        assert_eq!(index.due(100, 10), vec![CardId(2), CardId(1)]);
        assert_eq!(index.due(100, 1), vec![CardId(2)]);
        index.change(CardId(2), h(4, 50), Hold::NONE);
        assert_eq!(index.due(1000, 10), vec![CardId(1)]);
        assert_eq!(index.len(), 1);
    }
}
