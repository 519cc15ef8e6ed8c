//! What an answer changes in the reference ledger, as data: applied at once to the batch's
//! pending ledger, and again to the acknowledged ledger once its shard's commit returned (or,
//! after a failed commit, only for the records that survived recovery).

use citycard_protocol::CardId;

use crate::model::{Card, Hold, Model, Purchase, StaffUse, State, Use};

#[derive(Debug, Clone)]
pub enum Change {
    NewCard(CardId, Card),
    Balance(CardId, i64),
    State(CardId, State),
    UseAtc(CardId, u32, Use),
    Staff((String, u64), StaffUse),
    MoneyIn(i64),
    MoneyOut(i64),
    /// One more journaled record of this card.
    Op(CardId),
    Hold(CardId, Option<Hold>),
    Purchased(CardId, u32, Purchase),
    Reversed(CardId, u32),
}

/// The changes of one journaled record (`seq` 0: nothing was journaled).
#[derive(Debug, Clone)]
pub struct Effect {
    pub shard: u16,
    pub seq: u64,
    pub changes: Vec<Change>,
}

impl Model {
    pub fn apply(&mut self, effect: &Effect) {
        for change in &effect.changes {
            match change {
                Change::NewCard(id, card) => {
                    self.cards.insert(*id, card.clone());
                }
                Change::Balance(id, b) => {
                    if let Some(c) = self.cards.get_mut(id) {
                        c.balance = *b;
                    }
                }
                Change::State(id, s) => {
                    if let Some(c) = self.cards.get_mut(id) {
                        c.state = *s;
                    }
                }
                Change::UseAtc(id, atc, u) => {
                    if let Some(c) = self.cards.get_mut(id) {
                        c.last_atc = c.last_atc.max(*atc);
                        let mut u = u.clone();
                        u.ops_at = c.ops;
                        c.used.insert(*atc, u);
                    }
                }
                Change::Staff(key, s) => {
                    self.staff.insert(key.clone(), s.clone());
                }
                Change::MoneyIn(n) => self.money_in += n,
                Change::MoneyOut(n) => self.money_out += n,
                Change::Hold(id, h) => {
                    if let Some(c) = self.cards.get_mut(id) {
                        c.hold = *h;
                    }
                }
                Change::Purchased(id, atc, p) => {
                    if let Some(c) = self.cards.get_mut(id) {
                        c.purchases.insert(*atc, p.clone());
                    }
                }
                Change::Reversed(id, atc) => {
                    if let Some(p) = self.cards.get_mut(id).and_then(|c| c.purchases.get_mut(atc)) {
                        p.reversed = true;
                    }
                }
                Change::Op(id) => {
                    if let Some(c) = self.cards.get_mut(id) {
                        c.ops += 1;
                    }
                }
            }
        }
    }
}
