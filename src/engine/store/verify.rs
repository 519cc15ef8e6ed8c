//! The background check that sled's card records still match the card digest recorded with
//! them, run in small steps while the shard serves instead of over every card before it does.
//!
//! A pass walks sled's card table in key order, a few hundred cards per step. It sums the digest
//! term of each card's current record (the cache's when the card is cached, else sled's) into a
//! partial digest of the cards below its cursor. Cards that change behind the cursor while the
//! pass runs are adjusted in the partial sum (remove the old term, add the new); new cards are
//! counted when created and skipped when the walk meets them. When the walk reaches the end,
//! the partial sum must equal the shard's digest, and the cards counted the shard's count.
//! Every cached card that sled already holds must also be byte-for-byte sled's.
//!
//! It catches what the old full check at start caught (records lost, changed or left stale by
//! sled), a few seconds later instead of before serving: a mismatch stops the shard (fail-stop)
//! and marks the state so that the next start rebuilds it from the journal.

use std::collections::HashSet;

use citycard_protocol::CardId;

use super::{codec, CardStore, META_SUSPECT};
use crate::engine::checkpoint::StateDigest;
use crate::engine::error::Disagreement;
use crate::engine::state::{self, CardRecord};
use crate::engine::StoreError;

/// Cards one step reads: about 0.3 ms here (a sled range read and a SHA-256 each), so a step
/// after every batch adds little latency, and 500,000 cards are checked within a few thousand
/// batches or idle polls.
pub const STEP_CARDS: usize = 512;

/// A pass in progress.
pub(crate) struct Pass {
    /// The last card id the walk has counted (None: not started).
    cursor: Option<CardId>,
    /// Sum of the digest terms of every counted card, as the card is now.
    partial: StateDigest,
    /// Cards counted from sled.
    walked: u64,
    /// Cards created after the pass began (counted at creation, skipped by the walk).
    created: HashSet<CardId>,
}

/// A finished pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub cards: u64,
}

impl Pass {
    fn counted(&self, id: CardId) -> bool {
        self.cursor.is_some_and(|c| id <= c) || self.created.contains(&id)
    }

    /// A card changed (or was created) while the pass runs.
    pub(crate) fn changed(&mut self, id: CardId, before: Option<&CardRecord>, after: &CardRecord) {
        match before {
            Some(old) if self.counted(id) => {
                self.partial.remove(id, old);
                self.partial.add(id, after);
            }
            Some(_) => {}
            None => {
                if !self.counted(id) {
                    self.created.insert(id);
                }
                self.partial.add(id, after);
                if !self.created.contains(&id) {
                    // Created below the cursor (ids are allocated upwards, so not expected):
                    // counted like a walked card.
                    self.walked += 1;
                }
            }
        }
    }
}

impl CardStore {
    /// Begins a verification pass (after a start). A pass already running starts over.
    pub fn start_verify(&mut self) {
        self.verify = Some(Pass {
            cursor: None,
            partial: StateDigest::default(),
            walked: 0,
            created: HashSet::new(),
        });
    }

    pub fn verifying(&self) -> bool {
        self.verify.is_some()
    }

    /// Walks up to `max` more cards of the running pass. `Ok(Some)` when the pass finished and
    /// everything matched; an error when it did not (the state is marked for a rebuild first).
    pub fn verify_step(
        &mut self,
        max: usize,
        persisted: u64,
    ) -> Result<Option<Verified>, StoreError> {
        let Some(pass) = self.verify.as_mut() else {
            return Ok(None);
        };
        let from = match pass.cursor {
            Some(c) => state::card_key(CardId(c.0.saturating_add(1))),
            None => state::card_key(CardId(0)),
        };
        let end: &[u8] = &[state::CARD + 1];
        let mut read = 0usize;
        let mut problem = None;
        for item in self.db.range(&from[..]..end).take(max) {
            let (k, v) = item?;
            read += 1;
            let id = CardId(
                state::be_u64(&k[1..])
                    .ok_or(StoreError::Disagrees(Disagreement::CardKeyMalformed))?,
            );
            pass.cursor = Some(id);
            let stored = match codec::decode(&v) {
                Ok(r) => r,
                Err(e) => {
                    problem = Some(format!("card record {}: {e}", id.masked()));
                    break;
                }
            };
            let current = match self.cache.peek_state(id, persisted) {
                Some((cached, pinned)) => {
                    if !pinned && cached != stored {
                        problem = Some(format!(
                            "card {}: sled holds another record than the one it applied",
                            id.masked()
                        ));
                        break;
                    }
                    cached
                }
                None => stored,
            };
            if pass.created.contains(&id) {
                continue;
            }
            pass.partial.add(id, &current);
            pass.walked += 1;
        }
        if problem.is_none() && read < max {
            let counted = pass.walked + pass.created.len() as u64;
            if pass.partial != self.digest || counted != self.count {
                problem = Some(format!(
                    "the {counted} card records in sled do not match the card digest and count \
                     ({} cards) recorded with them",
                    self.count
                ));
            } else {
                self.verify = None;
                return Ok(Some(Verified { cards: counted }));
            }
        }
        match problem {
            None => Ok(None),
            Some(problem) => {
                self.verify = None;
                // Marked durably before stopping, so no later start serves this state.
                self.db.insert(META_SUSPECT, problem.as_bytes())?;
                self.db.flush()?;
                Err(StoreError::Disagrees(Disagreement::Verification(problem)))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn record(balance: i64) -> CardRecord {
        CardRecord::test_active(balance, 1, crate::journal::Pos { segment: 1, offset: 32 })
    }

    fn id(k: u64) -> CardId {
        crate::engine::card_id_for(0, 1, k)
    }

    /// Applies what the store sealed, as the persister does.
    fn persist(store: &mut CardStore) {
        let mut batch = sled::Batch::default();
        store.seal(&mut batch);
        store.db.apply_batch(batch).unwrap();
    }

    fn run(store: &mut CardStore, persisted: u64) -> Result<Option<Verified>, StoreError> {
        for _ in 0..1000 {
            if let Some(done) = store.verify_step(3, persisted)? {
                return Ok(Some(done));
            }
        }
        Ok(None)
    }

    fn store() -> CardStore {
        let db = sled::Config::new().temporary(true).open().unwrap();
        CardStore::open(db, 1, 4).unwrap()
    }

    #[test]
    fn a_pass_matches_while_cards_change_behind_and_ahead_of_it() {
        let mut s = store();
        for k in 0..10 {
            s.set(id(k), record(k as i64), k + 1, 0).unwrap();
        }
        persist(&mut s);
        s.persisted(10);
        s.start_verify();
        assert_eq!(s.verify_step(3, 10).unwrap(), None);
        // Behind the cursor, ahead of it, and a new card; one not yet persisted.
        s.set(id(1), record(100), 11, 10).unwrap();
        s.set(id(8), record(800), 12, 10).unwrap();
        s.set(id(10), record(5), 13, 10).unwrap();
        assert_eq!(s.verify_step(3, 10).unwrap(), None);
        persist(&mut s);
        s.set(id(0), record(7), 14, 13).unwrap();
        assert_eq!(run(&mut s, 13).unwrap(), Some(Verified { cards: 11 }));
        assert!(!s.verifying());
    }

    #[test]
    fn a_record_sled_changed_or_lost_is_found_and_marks_the_state() {
        let mut s = store();
        for k in 0..10 {
            s.set(id(k), record(k as i64), k + 1, 0).unwrap();
        }
        persist(&mut s);
        s.persisted(10);
        // sled loses one card behind the shard's back.
        s.db.remove(state::card_key(id(7))).unwrap();
        s.cache.clear();
        s.start_verify();
        let e = run(&mut s, 10).unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
        let db = s.db.clone();
        drop(s);
        let reopened = CardStore::open(db.clone(), 1, 4);
        assert!(matches!(reopened, Err(StoreError::Disagrees(_))));

        // A cached card whose sled record differs from what was applied.
        let mut s = store();
        s.set(id(0), record(1), 1, 0).unwrap();
        persist(&mut s);
        s.db.insert(state::card_key(id(0)), &*codec::encode(&record(2))).unwrap();
        s.start_verify();
        let e = run(&mut s, 1).unwrap_err();
        assert!(e.to_string().contains("another record"), "{e}");
    }
}
