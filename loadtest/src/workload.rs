//! The load: each worker is one simulated terminal pair driving its share of the cards through
//! the load loop (closed or open), checking every answer against its request, keeping the
//! reckoning of every balance, and (with `--verify`) reading every balance back at the end.
//!
//! Each worker is one simulated terminal pair: a reader connection (purchases, balance
//! inquiries) and, when the mix has top-ups or identity requests, a kiosk connection. A worker
//! owns a disjoint share of the cards and keeps at most one request per card in flight, so the
//! card's ATC only ever grows and two counter-consuming requests of one card never race.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use citycard_protocol::crypto::response_mac_ok;
use citycard_protocol::{
    Amount, Atc, CardAuth, Frame, Mac, MessageType, Request, Response, Status,
};
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::cards::Card;
use crate::client::{code_name, now_ms, response_type, Conn, ConnError, Incoming, Terminal};
use crate::mix::{Mix, Op, Rng};
use crate::stats::{new_histogram, Stats};

/// Purchase amounts, minor units (uniform).
pub const PURCHASE_AMOUNTS: (i64, i64) = (1, 300);
/// Top-up amounts, minor units (uniform).
pub const TOPUP_AMOUNTS: (i64, i64) = (100, 500);
/// A top-up is replaced by a purchase when the card might then hold more than this (the
/// server's default cap is 100,000).
pub const TOPUP_CEILING: i64 = 90_000;
/// Most requests a connection keeps outstanding during the final balance check.
const VERIFY_IN_FLIGHT: usize = 32;
/// Pause before reconnecting a failed connection.
const RECONNECT_DELAY: Duration = Duration::from_millis(200);
/// Open loop: a slot may be sent this much before its time. Tokio's timers tick in whole
/// milliseconds, so waiting for the exact slot would charge up to 1 ms of the tester's own timer
/// lag to the server; latency is measured from the earlier of the slot and the actual send.
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// The shared time line of a run.
#[derive(Clone, Copy, Debug)]
pub struct Timeline {
    pub start: Instant,
    /// End of the warm-up: requests intended from here on are measured.
    pub measure_start: Instant,
    /// No request is sent from here on.
    pub deadline: Instant,
}

/// What every worker is told.
pub struct Plan {
    pub addr: String,
    pub mix: Mix,
    pub pipeline: usize,
    /// Requests per second for each worker (open loop), `None` for closed loop.
    pub worker_rate: Option<f64>,
    pub timeout: Duration,
    pub verify: bool,
    /// Against the floor server: answers are judged by type alone (it decides nothing, so
    /// there is no card, ATC or MAC to check) and the terminal's role is not asked.
    pub floor: bool,
}

/// Progress shared with the live display.
pub struct Live {
    pub answered: AtomicU64,
    pub errors: AtomicU64,
    /// Every measured latency so far (the live p99).
    pub hist: Mutex<Histogram<u64>>,
    /// Measured latencies since the run last took a [`crate::stats::Sample`] (it resets this).
    pub window: Mutex<Histogram<u64>>,
}

impl Live {
    pub fn new() -> anyhow::Result<Live> {
        Ok(Live {
            answered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            hist: Mutex::new(new_histogram()?),
            window: Mutex::new(new_histogram()?),
        })
    }
}

/// One worker's terminals and cards.
pub struct WorkerSpec {
    pub index: usize,
    pub reader: Terminal,
    pub kiosk: Option<Terminal>,
    pub cards: Vec<Card>,
    pub seed: u64,
}

/// What a request carries back to the worker with its answer.
#[derive(Clone, Copy, Debug)]
struct Tag {
    card: usize,
    op: Op,
    amount: i64,
    atc: u32,
    cryptogram: Mac,
    /// Closed loop: when it was queued. Open loop: its slot in the schedule.
    intended: Instant,
    /// Sent in the balance check after the load.
    verify: bool,
    hello: bool,
}

impl Tag {
    fn hello() -> Tag {
        Tag {
            card: 0,
            op: Op::Balance,
            amount: 0,
            atc: 0,
            cryptogram: Mac::default(),
            intended: Instant::now(),
            verify: false,
            hello: true,
        }
    }
}

/// How an answer turned out.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A well-formed answer for the right card: its status, and the balance it reports when it
    /// is authenticated (carries a valid MAC) and is a card result.
    Answer { status: Status, balance: Option<i64> },
    /// No usable answer: the request's outcome is unknown.
    Failed { kind: String, bad_mac: bool },
}

/// Statuses the server sends without a MAC (the card was not authenticated).
fn unauthenticated(status: Status) -> bool {
    matches!(
        status,
        Status::UnknownCard
            | Status::BadCryptogram
            | Status::KeyVersionRetired
            | Status::NotPermitted
            | Status::Busy
            | Status::Unavailable
    )
}

/// Checks an answer against the request it answers: type, card, ATC, and the response MAC
/// (binding = the request cryptogram) whenever the status implies the card was authenticated.
fn judge(card: &Card, tag: &Tag, frame: &Frame) -> Verdict {
    let failed = |kind: String| Verdict::Failed { kind, bad_mac: false };
    let decoded = match Response::decode_body(frame.message_type, &frame.body) {
        Ok(r) => r,
        Err(e) => return failed(format!("undecodable {:?}: {e}", frame.message_type)),
    };
    if let Response::Error { code, .. } = decoded {
        return failed(format!("error frame {}", code_name(code)));
    }
    let expected = response_type(tag.op.request_type());
    if expected != Some(frame.message_type) {
        return failed(format!("{} answered by {:?}", tag.op.name(), frame.message_type));
    }
    let (status, card_id, atc, balance, mac) = match &decoded {
        Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => {
            (r.status, r.card_id, r.atc, Some(r.balance.0), r.mac)
        }
        Response::Identity(i) => (i.status, i.card_id, i.atc, None, i.mac),
        other => {
            return failed(format!("{} answered by {:?}", tag.op.name(), other.message_type()))
        }
    };
    if card_id != card.id || atc.0 != tag.atc {
        return failed("answer names another card or ATC".into());
    }
    if mac == Mac::default() && unauthenticated(status) {
        return Verdict::Answer { status, balance: None };
    }
    if !response_mac_ok(&card.key, frame.message_type as u8, &tag.cryptogram, &frame.body) {
        return Verdict::Failed { kind: "bad response MAC".into(), bad_mac: true };
    }
    Verdict::Answer { status, balance }
}

/// Checks a floor server's answer: the response type that answers the request, with a body
/// that decodes as one. The floor approves everything, so that is the status.
fn judge_floor(tag: &Tag, frame: &Frame) -> Verdict {
    let failed = |kind: String| Verdict::Failed { kind, bad_mac: false };
    match Response::decode_body(frame.message_type, &frame.body) {
        Err(e) => failed(format!("undecodable {:?}: {e}", frame.message_type)),
        Ok(Response::Error { code, .. }) => failed(format!("error frame {}", code_name(code))),
        Ok(_) if response_type(tag.op.request_type()) != Some(frame.message_type) => {
            failed(format!("{} answered by {:?}", tag.op.name(), frame.message_type))
        }
        Ok(_) => Verdict::Answer { status: Status::Approved, balance: None },
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Reader,
    Kiosk,
}

struct Worker {
    index: usize,
    plan: Arc<Plan>,
    live: Arc<Live>,
    rng: Rng,
    cards: Vec<Card>,
    free: Vec<usize>,
    reader_term: Terminal,
    kiosk_term: Option<Terminal>,
    reader: Option<Conn<Tag>>,
    kiosk: Option<Conn<Tag>>,
    reconnect_reader: Option<Instant>,
    reconnect_kiosk: Option<Instant>,
    stats: Stats,
    live_hist: Histogram<u64>,
    live_answered: u64,
    live_errors: u64,
    timeline: Option<Timeline>,
    next_slot: Option<Instant>,
    interval: Duration,
}

/// A connection's next frame, or never when it is down.
async fn next_of(conn: &mut Option<Conn<Tag>>) -> Result<Incoming<Tag>, ConnError> {
    match conn {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// Runs one worker: connect, wait for the common start, load until the deadline, drain, then
/// (with `verify`) check every card's balance. Returns its statistics and its cards.
pub async fn run_worker(
    spec: WorkerSpec,
    plan: Arc<Plan>,
    live: Arc<Live>,
    ready: Arc<tokio::sync::Barrier>,
    mut start: tokio::sync::watch::Receiver<Option<Timeline>>,
) -> anyhow::Result<(Stats, Vec<Card>)> {
    let free = (0..spec.cards.len()).collect();
    let interval = match plan.worker_rate {
        Some(rate) if rate > 0.0 => Duration::from_secs_f64(1.0 / rate),
        _ => Duration::ZERO,
    };
    let mut w = Worker {
        index: spec.index,
        plan,
        live,
        rng: Rng::new(spec.seed),
        cards: spec.cards,
        free,
        reader_term: spec.reader,
        kiosk_term: spec.kiosk,
        reader: None,
        kiosk: None,
        reconnect_reader: None,
        reconnect_kiosk: None,
        stats: Stats::new()?,
        live_hist: new_histogram()?,
        live_answered: 0,
        live_errors: 0,
        timeline: None,
        next_slot: None,
        interval,
    };
    w.connect(Side::Reader).await;
    if w.kiosk_term.is_some() {
        w.connect(Side::Kiosk).await;
    }
    ready.wait().await;
    let timeline = match start.wait_for(|t| t.is_some()).await {
        Ok(t) => (*t).ok_or_else(|| anyhow!("no start time"))?,
        Err(_) => bail!("the run was abandoned before it started"),
    };
    w.timeline = Some(timeline);
    if w.plan.worker_rate.is_some() {
        // Spread the workers' schedules evenly over one interval.
        let n = w.index as u32;
        w.next_slot = Some(timeline.start + w.interval / 64 * (n % 64));
    }
    w.load(timeline).await;
    if w.plan.verify {
        w.verify().await;
    }
    w.publish_live();
    w.stats.dead_cards = w.cards.iter().filter(|c| c.dead).count() as u64;
    Ok((w.stats, w.cards))
}

impl Worker {
    fn conn_mut(&mut self, side: Side) -> &mut Option<Conn<Tag>> {
        match side {
            Side::Reader => &mut self.reader,
            Side::Kiosk => &mut self.kiosk,
        }
    }

    fn error(&mut self, kind: impl Into<String>) {
        *self.stats.errors.entry(kind.into()).or_insert(0) += 1;
        self.live_errors += 1;
    }

    /// Opens (or reopens) one connection and checks the role the server sees.
    async fn connect(&mut self, side: Side) {
        let term = match side {
            Side::Reader => Some(self.reader_term.clone()),
            Side::Kiosk => self.kiosk_term.clone(),
        };
        let Some(term) = term else {
            return;
        };
        let want_role = if side == Side::Reader { 1 } else { 2 };
        let result = async {
            let mut conn: Conn<Tag> =
                Conn::connect(&self.plan.addr, term.config.clone(), &term.id, self.plan.timeout)
                    .await?;
            let info = conn.hello(now_ms(), self.plan.timeout, Tag::hello()).await?;
            if !self.plan.floor && info.role != want_role {
                bail!(
                    "terminal {} has role {} at the server, expected {want_role}",
                    term.id,
                    info.role
                );
            }
            anyhow::Ok(conn)
        }
        .await;
        match result {
            Ok(conn) => {
                *self.conn_mut(side) = Some(conn);
                match side {
                    Side::Reader => self.reconnect_reader = None,
                    Side::Kiosk => self.reconnect_kiosk = None,
                }
            }
            Err(e) => {
                if self.stats.first_connect_error.is_none() {
                    self.stats.first_connect_error = Some(format!("{e:#}"));
                }
                self.error("connection failure (connect)");
                let at = Some(Instant::now() + RECONNECT_DELAY);
                match side {
                    Side::Reader => self.reconnect_reader = at,
                    Side::Kiosk => self.reconnect_kiosk = at,
                }
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.reader.as_ref().map_or(0, |c| c.in_flight())
            + self.kiosk.as_ref().map_or(0, |c| c.in_flight())
    }

    /// Builds a card request; consuming requests advance the card's ATC.
    fn build(&mut self, card: usize, op: Op, amount: i64, side: Side) -> (Request, u32, Mac) {
        let nonce = self.rng.next_u64();
        let terminal = match side {
            Side::Reader => &self.reader_term.id,
            Side::Kiosk => self.kiosk_term.as_ref().map_or("", |t| t.id.as_str()),
        };
        let c = &mut self.cards[card];
        let atc = if op.consumes_atc() {
            c.atc += 1;
            c.atc
        } else {
            c.atc + 1
        };
        let cryptogram = c.key.request_cryptogram(
            op.request_type() as u8,
            c.id,
            Atc(atc),
            Amount(amount),
            nonce,
            terminal,
        );
        let auth = CardAuth { card_id: c.id, atc: Atc(atc), nonce, cryptogram };
        let request = match op {
            Op::Purchase => Request::Purchase { auth, amount: Amount(amount) },
            Op::TopUp => Request::TopUp { auth, amount: Amount(amount) },
            Op::Balance => Request::Balance { auth },
            Op::Identity => Request::Identity { auth },
        };
        (request, atc, cryptogram)
    }

    /// Queues as many requests as the pipeline depth, the free cards and (open loop) the
    /// schedule allow.
    fn refill(&mut self, now: Instant, timeline: &Timeline) {
        while self.in_flight() < self.plan.pipeline && !self.free.is_empty() {
            let intended = match self.next_slot {
                None => Instant::now(),
                Some(slot) if slot <= now + TIMER_SLACK && slot < timeline.deadline => slot,
                Some(_) => break,
            };
            let mut op = self.plan.mix.pick(self.rng.next_u64());
            let slot = self.rng.below(self.free.len() as u64) as usize;
            let card = self.free[slot];
            let mut amount = match op {
                Op::Purchase => self.rng.between(PURCHASE_AMOUNTS.0, PURCHASE_AMOUNTS.1),
                Op::TopUp => self.rng.between(TOPUP_AMOUNTS.0, TOPUP_AMOUNTS.1),
                _ => 0,
            };
            if op == Op::TopUp && self.cards[card].reck.max() + amount > TOPUP_CEILING {
                op = Op::Purchase;
                amount = self.rng.between(PURCHASE_AMOUNTS.0, PURCHASE_AMOUNTS.1);
                self.stats.topups_skipped += 1;
            }
            let side = if op.on_kiosk() { Side::Kiosk } else { Side::Reader };
            if self.conn_mut(side).is_none() {
                // Down: wait for the reconnect (open loop: the schedule slips, which the
                // latency of later requests shows).
                break;
            }
            let (request, atc, cryptogram) = self.build(card, op, amount, side);
            let tag =
                Tag { card, op, amount, atc, cryptogram, intended, verify: false, hello: false };
            let queued = match self.conn_mut(side) {
                Some(conn) => conn.queue(&request, tag).is_ok(),
                None => false,
            };
            if !queued {
                self.error("encode failure");
                self.cards[card].dead = true;
                self.free.swap_remove(slot);
                continue;
            }
            self.free.swap_remove(slot);
            self.stats.sent += 1;
            if let Some(slot) = self.next_slot.as_mut() {
                *slot += self.interval;
            }
        }
    }

    async fn flush_all(&mut self) {
        for side in [Side::Reader, Side::Kiosk] {
            let failed = match self.conn_mut(side) {
                Some(conn) => conn.flush().await.err(),
                None => None,
            };
            if let Some(e) = failed {
                self.connection_lost(side, &e);
            }
        }
    }

    /// The connection failed: every request in flight on it has an unknown outcome.
    fn connection_lost(&mut self, side: Side, error: &ConnError) {
        let Some(mut conn) = self.conn_mut(side).take() else {
            return;
        };
        let name = if side == Side::Reader { "reader" } else { "kiosk" };
        if self.stats.first_connect_error.is_none() {
            self.stats.first_connect_error = Some(format!("{} ({name}): {error}", conn.terminal));
        }
        self.error(format!("connection failure ({name} lost)"));
        for tag in conn.take_all() {
            self.unknown_outcome(&tag);
        }
        let at = Some(Instant::now() + RECONNECT_DELAY);
        match side {
            Side::Reader => self.reconnect_reader = at,
            Side::Kiosk => self.reconnect_kiosk = at,
        }
    }

    /// A request whose answer will never be trusted: the card leaves the load and its
    /// reckoning accepts either outcome.
    fn unknown_outcome(&mut self, tag: &Tag) {
        if tag.hello {
            return;
        }
        let card = &mut self.cards[tag.card];
        if !tag.verify {
            card.reck.unsure(tag.op.delta(tag.amount));
        }
        card.dead = true;
    }

    fn on_incoming(&mut self, side: Side, incoming: Result<Incoming<Tag>, ConnError>) {
        let mut next = Some(incoming);
        while let Some(item) = next.take() {
            match item {
                Err(e) => {
                    self.connection_lost(side, &e);
                    return;
                }
                Ok(Incoming::Stray(frame)) => self.stray(&frame),
                Ok(Incoming::Answer(frame, sent, tag)) => self.answer(&frame, sent, tag),
            }
            // More frames may already be buffered: take them without another wake-up.
            next = self.conn_mut(side).as_mut().and_then(|c| c.try_next());
        }
    }

    fn stray(&mut self, frame: &Frame) {
        if frame.message_type == MessageType::Error {
            let what = match Response::decode_body(frame.message_type, &frame.body) {
                Ok(Response::Error { code, .. }) => code_name(code),
                _ => "undecodable".into(),
            };
            self.error(format!("error frame {what} (request id {})", frame.request_id.0));
        } else {
            // An answer after its request had timed out.
            self.stats.late_answers += 1;
        }
    }

    /// `sent`: when the request was queued. Latency runs from its intended time (open loop:
    /// its slot, so a late send counts against the server as wrk2 does) or from the actual send
    /// when that was earlier (a slot taken within [`TIMER_SLACK`] before its time).
    fn answer(&mut self, frame: &Frame, sent: Instant, tag: Tag) {
        if tag.hello {
            return;
        }
        let now = Instant::now();
        if tag.verify {
            self.verify_answer(frame, &tag);
            return;
        }
        let verdict = if self.plan.floor {
            judge_floor(&tag, frame)
        } else {
            judge(&self.cards[tag.card], &tag, frame)
        };
        let (measured, in_window) = match &self.timeline {
            Some(t) => (
                tag.intended >= t.measure_start && tag.intended < t.deadline,
                now >= t.measure_start && now <= t.deadline,
            ),
            None => (false, false),
        };
        if in_window {
            self.stats.throughput_count += 1;
        }
        self.live_answered += 1;
        match verdict {
            Verdict::Answer { status, balance } => {
                let start = tag.intended.min(sent);
                let latency_us = now.saturating_duration_since(start).as_micros() as u64;
                if measured {
                    self.stats.hist.saturating_record(latency_us.max(1));
                    self.live_hist.saturating_record(latency_us.max(1));
                    self.stats.count(tag.op, status);
                }
                let plan_verify = self.plan.verify;
                let card = &mut self.cards[tag.card];
                if status == Status::Approved {
                    card.reck.settle(tag.op.delta(tag.amount));
                }
                if let (true, Some(b), true) = (plan_verify, balance, card.reck.exact()) {
                    if b != card.reck.base {
                        let text = format!(
                            "card {}: {} answer ({status:?}) reports balance {b}, expected {}",
                            card.id.0,
                            tag.op.name(),
                            card.reck.base
                        );
                        self.stats.live_mismatch(text);
                    }
                }
                self.free.push(tag.card);
            }
            Verdict::Failed { kind, bad_mac } => {
                if bad_mac {
                    self.stats.bad_macs += 1;
                }
                self.error(kind);
                self.unknown_outcome(&tag);
            }
        }
    }

    fn expire_older_than_timeout(&mut self) {
        let now = Instant::now();
        if let Some(cutoff) = now.checked_sub(self.plan.timeout) {
            self.expire(cutoff);
        }
    }

    fn expire(&mut self, cutoff: Instant) {
        for side in [Side::Reader, Side::Kiosk] {
            let expired = match self.conn_mut(side) {
                Some(conn) => conn.expire(cutoff),
                None => Vec::new(),
            };
            for tag in expired {
                if tag.hello {
                    continue;
                }
                self.stats.timeouts += 1;
                self.live_errors += 1;
                if tag.verify {
                    self.stats.verify_unchecked += 1;
                }
                self.unknown_outcome(&tag);
            }
        }
    }

    fn publish_live(&mut self) {
        self.live.answered.fetch_add(std::mem::take(&mut self.live_answered), Ordering::Relaxed);
        self.live.errors.fetch_add(std::mem::take(&mut self.live_errors), Ordering::Relaxed);
        if !self.live_hist.is_empty() {
            // Short sections without an await: the run's display and sampler read them.
            if let Ok(mut h) = self.live.hist.lock() {
                let _ = h.add(&self.live_hist);
            }
            if let Ok(mut h) = self.live.window.lock() {
                let _ = h.add(&self.live_hist);
            }
            self.live_hist.reset();
        }
    }

    async fn reconnect_due(&mut self, now: Instant, allowed: bool) {
        if !allowed {
            return;
        }
        if self.reader.is_none() && self.reconnect_reader.is_some_and(|t| t <= now) {
            self.connect(Side::Reader).await;
        }
        if self.kiosk.is_none() && self.reconnect_kiosk.is_some_and(|t| t <= now) {
            self.connect(Side::Kiosk).await;
        }
    }

    async fn load(&mut self, timeline: Timeline) {
        let drain_end = timeline.deadline + self.plan.timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::time::sleep_until(timeline.start).await;
        loop {
            let now = Instant::now();
            let sending = now < timeline.deadline;
            self.reconnect_due(now, sending).await;
            if sending {
                self.refill(now, &timeline);
            } else if self.in_flight() == 0 || now >= drain_end {
                break;
            }
            self.flush_all().await;
            let wake = match self.next_slot {
                Some(slot)
                    if sending
                        && self.in_flight() < self.plan.pipeline
                        && !self.free.is_empty() =>
                {
                    slot.checked_sub(TIMER_SLACK).unwrap_or(slot).min(timeline.deadline)
                }
                _ if sending => timeline.deadline,
                _ => drain_end,
            };
            tokio::select! {
                r = next_of(&mut self.reader) => self.on_incoming(Side::Reader, r),
                r = next_of(&mut self.kiosk) => self.on_incoming(Side::Kiosk, r),
                _ = tokio::time::sleep_until(wake) => {}
                _ = tick.tick() => {
                    self.expire_older_than_timeout();
                    self.publish_live();
                }
            }
        }
        // Whatever is still unanswered waited at least the timeout.
        self.expire(Instant::now() + Duration::from_secs(1));
        if let Some(slot) = self.next_slot {
            if slot < timeline.deadline && !self.interval.is_zero() {
                let behind = (timeline.deadline - slot).as_secs_f64() / self.interval.as_secs_f64();
                self.stats.behind_schedule += behind.ceil() as u64;
            }
        }
    }

    /// Reads every card's balance over the reader connection and compares it with the
    /// reckoning.
    async fn verify(&mut self) {
        let total = self.cards.len();
        let mut next = 0;
        let mut attempts = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.reader.is_none() {
                attempts += 1;
                if attempts > 3 {
                    break;
                }
                tokio::time::sleep(RECONNECT_DELAY).await;
                self.connect(Side::Reader).await;
                continue;
            }
            while next < total
                && self.reader.as_ref().map_or(0, |c| c.in_flight()) < VERIFY_IN_FLIGHT
            {
                let (request, atc, cryptogram) = self.build(next, Op::Balance, 0, Side::Reader);
                let tag = Tag {
                    card: next,
                    op: Op::Balance,
                    amount: 0,
                    atc,
                    cryptogram,
                    intended: Instant::now(),
                    verify: true,
                    hello: false,
                };
                if let Some(conn) = self.reader.as_mut() {
                    if conn.queue(&request, tag).is_err() {
                        self.stats.verify_unchecked += 1;
                    }
                }
                next += 1;
            }
            self.flush_all().await;
            if next >= total && self.in_flight() == 0 {
                break;
            }
            tokio::select! {
                r = next_of(&mut self.reader) => {
                    if r.is_err() {
                        // Requests lost with the connection are unchecked, not mismatched.
                        let lost = self.reader.as_ref().map_or(0, |c| c.in_flight());
                        self.stats.verify_unchecked += lost as u64;
                    }
                    self.on_incoming(Side::Reader, r)
                }
                _ = tick.tick() => self.expire_older_than_timeout(),
            }
        }
        self.stats.verify_unchecked += (total - next.min(total)) as u64;
        if let Some(conn) = self.reader.as_mut() {
            let left = conn.take_all().len();
            self.stats.verify_unchecked += left as u64;
        }
    }

    fn verify_answer(&mut self, frame: &Frame, tag: &Tag) {
        let card = &self.cards[tag.card];
        match judge(card, tag, frame) {
            Verdict::Answer { status: Status::Approved, balance: Some(b) } => {
                self.stats.verify_checked += 1;
                if !card.reck.accepts(b) {
                    let text = format!(
                        "card {}: server balance {b}, tester expected {}",
                        card.id.0,
                        card.reck.describe()
                    );
                    self.stats.verify_mismatch(text);
                }
            }
            Verdict::Answer { status, .. } => {
                let text = format!("card {}: balance check answered {status:?}", card.id.0);
                self.stats.verify_checked += 1;
                self.stats.verify_mismatch(text);
            }
            Verdict::Failed { kind, bad_mac } => {
                if bad_mac {
                    self.stats.bad_macs += 1;
                }
                self.stats.verify_unchecked += 1;
                self.error(format!("{kind} (balance check)"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cards::Reckoning;
    use citycard_protocol::crypto::CardKey;
    use citycard_protocol::CardId;

    fn test_card() -> Card {
        Card {
            id: CardId(77),
            key: CardKey::from_bytes([9; 32]),
            atc: 3,
            reck: Reckoning::new(1_000),
            dead: false,
        }
    }

    fn sealed(card: &Card, tag: &Tag, status: Status, balance: i64, with_mac: bool) -> Frame {
        let mut result = citycard_protocol::CardResult {
            status,
            card_id: card.id,
            atc: Atc(tag.atc),
            balance: Amount(balance),
            journal_seq: 1,
            mac: Mac::default(),
        };
        let mut body = bytes::BytesMut::new();
        Response::Purchase(result).encode_body(&mut body).expect("encode");
        if with_mac {
            let split = body.len() - 16;
            result.mac = card.key.response_mac(
                MessageType::PurchaseResult as u8,
                &tag.cryptogram,
                &body[..split],
            );
            body.clear();
            Response::Purchase(result).encode_body(&mut body).expect("encode");
        }
        Frame {
            message_type: MessageType::PurchaseResult,
            request_id: citycard_protocol::RequestId(1),
            body: body.freeze(),
        }
    }

    #[test]
    fn judge_checks_macs_and_accepts_unsealed_unauthenticated_declines() {
        let card = test_card();
        let tag = Tag {
            card: 0,
            op: Op::Purchase,
            amount: 100,
            atc: 4,
            cryptogram: Mac([5; 16]),
            intended: Instant::now(),
            verify: false,
            hello: false,
        };
        let ok = sealed(&card, &tag, Status::Approved, 900, true);
        assert_eq!(
            judge(&card, &tag, &ok),
            Verdict::Answer { status: Status::Approved, balance: Some(900) }
        );
        let unsealed = sealed(&card, &tag, Status::Approved, 900, false);
        assert!(matches!(judge(&card, &tag, &unsealed), Verdict::Failed { bad_mac: true, .. }));
        let busy = sealed(&card, &tag, Status::Busy, 0, false);
        assert_eq!(
            judge(&card, &tag, &busy),
            Verdict::Answer { status: Status::Busy, balance: None }
        );
        let other_atc = Tag { atc: 5, ..tag };
        assert!(matches!(judge(&card, &other_atc, &ok), Verdict::Failed { bad_mac: false, .. }));
        let wrong_op = Tag { op: Op::TopUp, ..tag };
        assert!(matches!(judge(&card, &wrong_op, &ok), Verdict::Failed { .. }));
    }
}
