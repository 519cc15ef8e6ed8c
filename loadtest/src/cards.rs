//! The simulated cards: what a real card stores (id, key, counter) plus the tester's reckoning
//! of its balance; issuing them through a counter terminal before the load, or making them up
//! locally for a floor run, where no server keeps cards.

use std::time::Duration;

use anyhow::{anyhow, bail};
use citycard_client::Client;
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Amount, Atc, CardAuth, CardId, Mac, Status};
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::client::{now_ms, Terminal};
use crate::mix::{Op, Rng};

/// Most issue requests in flight during setup.
const ISSUE_IN_FLIGHT: usize = 64;

/// What the tester believes a card's balance is: `base` plus any subset of `unknown` (the
/// effects of requests whose answer never arrived, each either applied or not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reckoning {
    pub base: i64,
    pub unknown: Vec<i64>,
}

impl Reckoning {
    pub fn new(balance: i64) -> Reckoning {
        Reckoning { base: balance, unknown: Vec::new() }
    }

    /// An answered, approved change.
    pub fn settle(&mut self, delta: i64) {
        self.base += delta;
    }

    /// A change that may or may not have happened.
    pub fn unsure(&mut self, delta: i64) {
        if delta != 0 {
            self.unknown.push(delta);
        }
    }

    pub fn exact(&self) -> bool {
        self.unknown.is_empty()
    }

    pub fn min(&self) -> i64 {
        self.base + self.unknown.iter().filter(|d| **d < 0).sum::<i64>()
    }

    pub fn max(&self) -> i64 {
        self.base + self.unknown.iter().filter(|d| **d > 0).sum::<i64>()
    }

    /// Whether the server's balance is one of the possible outcomes (exactly, for up to 16
    /// unknown requests; within [min, max] beyond that).
    pub fn accepts(&self, balance: i64) -> bool {
        if self.unknown.len() > 16 {
            return (self.min()..=self.max()).contains(&balance);
        }
        (0u32..(1 << self.unknown.len())).any(|mask| {
            let sum: i64 = self
                .unknown
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, d)| *d)
                .sum();
            self.base + sum == balance
        })
    }

    pub fn describe(&self) -> String {
        if self.exact() {
            format!("{}", self.base)
        } else {
            let parts: Vec<String> = self.unknown.iter().map(|d| format!("{d:+}")).collect();
            format!("{} (plus any of {} unanswered)", self.base, parts.join(" "))
        }
    }
}

/// A simulated card: what a real card stores (id, key, counter) plus the tester's reckoning.
#[derive(Clone, Debug)]
pub struct Card {
    pub id: CardId,
    pub key: CardKey,
    /// The last ATC a consuming request used (the server's last ATC is at most this).
    pub atc: u32,
    pub reck: Reckoning,
    /// Taken out of the load after a request's outcome became unknown.
    pub dead: bool,
    pub transit: TransitState,
}

/// What the tester knows of a card for the protocol 1.2 operations of the mix.
#[derive(Clone, Debug, Default)]
pub struct TransitState {
    /// The last answers said the card has an open tap-in hold.
    pub hold: bool,
    /// The last approved purchase not yet reversed: its ATC, request cryptogram and amount.
    pub purchase: Option<(Atc, Mac, i64)>,
    /// The last answered consuming request (its operation, card authentication and amount):
    /// what an inquiry asks about.
    pub last: Option<(Op, CardAuth, i64)>,
}

/// `count` cards made up here for a floor run (ids 1..=count, keys from `seed`): the floor
/// server keeps no cards, so none are issued.
pub fn made_up(count: usize, deposit: i64, seed: u64) -> Vec<Card> {
    let mut rng = Rng::new(seed ^ 0xF100_0C4A_4D5E_ED00);
    (1..=count as u64)
        .map(|id| {
            let mut key = [0u8; 32];
            for chunk in key.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            Card {
                id: CardId(id),
                key: CardKey::from_bytes(key),
                atc: 0,
                reck: Reckoning::new(deposit),
                dead: false,
                transit: TransitState::default(),
            }
        })
        .collect()
}

/// Issues `count` cards through a counter terminal, `ISSUE_IN_FLIGHT` issues pipelined, each
/// with `deposit`. `op_ref_base` must not have been used by this terminal before (op_refs are
/// exactly-once per terminal: a reused one returns the old card). The client retries Busy and
/// lost connections with the same op_ref and checks each new card's MAC under its key.
pub async fn issue_cards(
    counter: &Terminal,
    count: usize,
    deposit: i64,
    op_ref_base: u64,
    timeout: Duration,
) -> anyhow::Result<Vec<Card>> {
    let mut config = counter.config.clone();
    let timeout_ms = timeout.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
    config.connect_timeout_ms = timeout_ms;
    config.request_timeout_ms = timeout_ms;
    config.max_in_flight = ISSUE_IN_FLIGHT.min(citycard_client::MAX_IN_FLIGHT);
    let client = Client::new(config).map_err(|e| anyhow!("terminal {}: {e}", counter.id))?;
    let info = client.hello(now_ms()).await.map_err(|e| anyhow!("{}: hello: {e}", counter.id))?;
    if info.role != 3 {
        bail!("terminal {} is not a counter (server says role {})", counter.id, info.role);
    }
    let mut todo = (0..count as u64).map(|i| op_ref_base + i);
    let mut in_flight = FuturesUnordered::new();
    let mut cards = Vec::with_capacity(count);
    loop {
        while in_flight.len() < ISSUE_IN_FLIGHT {
            let Some(op_ref) = todo.next() else {
                break;
            };
            let client = client.clone();
            in_flight.push(async move { (op_ref, client.issue(op_ref, Amount(deposit)).await) });
        }
        let Some((op_ref, outcome)) = in_flight.next().await else {
            break;
        };
        let issued = outcome.map_err(|e| {
            anyhow!("issue op_ref {op_ref}: {e} ({} of {count} issued)", cards.len())
        })?;
        if issued.status != Status::Approved {
            bail!("issue op_ref {op_ref} declined: {:?}", issued.status);
        }
        if issued.balance.0 != deposit {
            bail!(
                "issue op_ref {op_ref}: card {} has balance {} instead of the deposit {deposit}",
                issued.card_id.0,
                issued.balance.0
            );
        }
        cards.push(Card {
            id: issued.card_id,
            key: CardKey::from_bytes(issued.card_key),
            atc: 0,
            reck: Reckoning::new(deposit),
            dead: false,
            transit: TransitState::default(),
        });
    }
    Ok(cards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reckoning_exact_and_with_unknown_outcomes() {
        let mut r = Reckoning::new(50_000);
        r.settle(-300);
        r.settle(200);
        assert!(r.exact());
        assert!(r.accepts(49_900));
        assert!(!r.accepts(49_901));
        r.unsure(-150);
        assert!(!r.exact());
        assert!(r.accepts(49_900));
        assert!(r.accepts(49_750));
        assert!(!r.accepts(49_800));
        r.unsure(400);
        // Any subset of {-150, +400}.
        for ok in [49_900, 49_750, 50_300, 50_150] {
            assert!(r.accepts(ok), "{ok}");
        }
        assert!(!r.accepts(50_000));
        assert_eq!(r.min(), 49_750);
        assert_eq!(r.max(), 50_300);
        r.unsure(0);
        assert_eq!(r.unknown.len(), 2);
        assert!(r.describe().contains("-150"));
    }

    #[test]
    fn reckoning_with_many_unknowns_falls_back_to_the_range() {
        let mut r = Reckoning::new(0);
        for _ in 0..20 {
            r.unsure(-10);
        }
        assert!(r.accepts(-200));
        assert!(r.accepts(-5));
        assert!(!r.accepts(1));
        assert!(!r.accepts(-201));
    }
}
