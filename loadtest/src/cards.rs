//! The simulated cards: what a real card stores (id, key, counter) plus the tester's reckoning
//! of its balance; issuing them through a counter terminal before the load, or making them up
//! locally for a floor run, where no server keeps cards.

use std::time::Duration;

use anyhow::{anyhow, bail};
use citycard_protocol::crypto::{response_mac_ok, staff_binding, CardKey};
use citycard_protocol::{Amount, CardId, MessageType, Request, Response, Status};

use crate::client::{code_name, now_ms, Conn, Incoming, Terminal};
use crate::mix::Rng;

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
            }
        })
        .collect()
}

/// Issues `count` cards through a counter terminal, `ISSUE_IN_FLIGHT` issues pipelined, each
/// with `deposit`. `op_ref_base` must not have been used by this terminal before (op_refs are
/// exactly-once per terminal: a reused one returns the old card).
pub async fn issue_cards(
    addr: &str,
    counter: &Terminal,
    count: usize,
    deposit: i64,
    op_ref_base: u64,
    timeout: Duration,
) -> anyhow::Result<Vec<Card>> {
    let mut conn: Conn<u64> =
        Conn::connect(addr, counter.config.clone(), &counter.id, timeout).await?;
    let info = conn.hello(now_ms(), timeout, 0).await?;
    if info.role != 3 {
        bail!("terminal {} is not a counter (server says role {})", counter.id, info.role);
    }
    let mut todo: std::collections::VecDeque<u64> =
        (0..count as u64).map(|i| op_ref_base + i).collect();
    let mut cards = Vec::with_capacity(count);
    while cards.len() < count {
        while conn.in_flight() < ISSUE_IN_FLIGHT {
            let Some(op_ref) = todo.pop_front() else {
                break;
            };
            conn.queue(&Request::Issue { op_ref, deposit: Amount(deposit) }, op_ref)?;
        }
        conn.flush().await.map_err(|e| anyhow!("issuing cards: {e}"))?;
        let incoming = match tokio::time::timeout(timeout, conn.next()).await {
            Err(_) => bail!(
                "issuing cards: no answer within {timeout:?} ({} of {count} issued)",
                cards.len()
            ),
            Ok(Err(e)) => bail!("issuing cards: connection failed: {e}"),
            Ok(Ok(incoming)) => incoming,
        };
        let (frame, op_ref) = match incoming {
            Incoming::Answer(frame, _, op_ref) => (frame, op_ref),
            Incoming::Stray(frame) => bail!(
                "issuing cards: unexpected {:?} frame (request id {})",
                frame.message_type,
                frame.request_id.0
            ),
        };
        let result = match Response::decode_body(frame.message_type, &frame.body) {
            Ok(Response::Issue(result)) => result,
            Ok(Response::Error { code, message }) => {
                bail!("issue op_ref {op_ref}: error frame {}: {message}", code_name(code))
            }
            Ok(other) => bail!("issue op_ref {op_ref}: answered by {:?}", other.message_type()),
            Err(e) => bail!("issue op_ref {op_ref}: undecodable answer: {e}"),
        };
        match result.status {
            Status::Approved => {}
            Status::Busy | Status::Unavailable => {
                // Not done: retry the same op_ref (exactly-once makes that safe).
                todo.push_back(op_ref);
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            other => bail!("issue op_ref {op_ref} declined: {other:?}"),
        }
        let key = CardKey::from_bytes(result.card_key);
        if !response_mac_ok(
            &key,
            MessageType::IssueResult as u8,
            &staff_binding(op_ref),
            &frame.body,
        ) {
            bail!(
                "issue op_ref {op_ref}: bad response MAC on the answer for card {}",
                result.card_id.0
            );
        }
        if result.balance.0 != deposit {
            bail!(
                "issue op_ref {op_ref}: card {} has balance {} instead of the deposit {deposit}",
                result.card_id.0,
                result.balance.0
            );
        }
        cards.push(Card {
            id: result.card_id,
            key,
            atc: 0,
            reck: Reckoning::new(deposit),
            dead: false,
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
