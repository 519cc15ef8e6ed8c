//! The load: each worker is one simulated terminal pair driving its share of the cards through
//! the load loop (closed or open), checking every answer against its request, keeping the
//! reckoning of every balance, and (with `--verify`) reading every balance back at the end.
//!
//! Each worker is one simulated terminal pair: a reader [`Client`] (purchases, balance
//! inquiries) and, when the mix has top-ups or identity requests, a kiosk [`Client`]. The
//! clients pipeline the requests by request id and check every answer (card, ATC, response
//! MAC); they are configured to send each request once, so a timeout or a lost connection is
//! counted here instead of retried. A worker owns a disjoint share of the cards and keeps at most
//! one request per card in flight, so the card's ATC only ever grows and two counter-consuming
//! requests of one card never race.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use citycard_client::{Client, ClientError};
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Amount, Atc, CardAuth, Mac, Request, Status};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::cards::Card;
use crate::client::{now_ms, Terminal};
use crate::mix::{Mix, Op, Rng};
use crate::stats::{new_histogram, Stats};
use crate::verdict::{judge, unauthenticated, Answer, Verdict};

/// Purchase amounts, minor units (uniform).
pub const PURCHASE_AMOUNTS: (i64, i64) = (1, 300);
/// Top-up amounts, minor units (uniform).
pub const TOPUP_AMOUNTS: (i64, i64) = (100, 500);
/// A top-up is replaced by a purchase when the card might then hold more than this (the
/// server's default cap is 100,000).
pub const TOPUP_CEILING: i64 = 90_000;
/// Tap-out fares, minor units (uniform): up to the server's default maximum fare, 400 (a fare
/// above the hold is declined InvalidAmount and moves nothing).
pub const TAPOUT_FARES: (i64, i64) = (0, 400);
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
    /// Closed loop: when it was queued. Open loop: its slot in the schedule.
    intended: Instant,
    /// When it was handed to the client.
    sent: Instant,
    /// Sent in the balance check after the load.
    verify: bool,
    side: Side,
    /// The card authentication sent (set by `start`).
    auth: CardAuth,
}

/// A request in flight: the client call, resolving to its tag and the outcome.
type InFlight = Pin<Box<dyn Future<Output = (Tag, Result<Answer, ClientError>)> + Send>>;

/// A placeholder until `Worker::start` fills in the authentication it sends.
const NO_AUTH: CardAuth = CardAuth {
    card_id: citycard_protocol::CardId(0),
    atc: Atc(0),
    nonce: 0,
    cryptogram: Mac([0; 16]),
};

/// The request `op` sent with `auth` and `amount`, as an inquiry repeats it (a reversal's
/// original purchase is not part of what an inquiry carries).
fn request_of(op: Op, auth: CardAuth, amount: i64) -> Request {
    let amount = Amount(amount);
    match op {
        Op::Purchase => Request::Purchase { auth, amount },
        Op::TopUp => Request::TopUp { auth, amount },
        Op::Identity => Request::Identity { auth },
        Op::TapIn => Request::TapIn { auth },
        Op::TapOut => Request::TapOut { auth, fare: amount },
        Op::Reversal => Request::Reversal {
            auth,
            amount,
            original_atc: Atc(0),
            original_cryptogram: Mac::default(),
        },
        Op::Balance | Op::Inquiry => Request::Balance { auth },
    }
}

/// Keeps the tester's transit knowledge of `card` in step with an answer of `status` to
/// `tag`. Returns a mismatch when an inquiry about an answered request did not find it.
fn follow_transit(card: &mut Card, tag: &Tag, status: Status) -> Option<String> {
    let approved = status == Status::Approved;
    let t = &mut card.transit;
    match tag.op {
        Op::Purchase if approved => {
            t.purchase = Some((tag.auth.atc, tag.auth.cryptogram, tag.amount))
        }
        // Approved or not, that purchase is not tried again.
        Op::Reversal => t.purchase = None,
        Op::TapIn if approved || status == Status::HoldExists => t.hold = true,
        Op::TapOut if approved || status == Status::NoOpenHold => t.hold = false,
        Op::Inquiry if !approved && !unauthenticated(status) => {
            return Some(format!(
                "card {}: inquiry about ATC {} ({}) answered {status:?}, not its original answer",
                card.id.0,
                tag.auth.atc.0,
                t.last.map_or("?", |(op, _, _)| op.name())
            ));
        }
        _ => {}
    }
    if tag.op.consumes_atc() && !unauthenticated(status) {
        t.last = Some((tag.op, tag.auth, tag.amount));
    }
    None
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Reader,
    Kiosk,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Reader => "reader",
            Side::Kiosk => "kiosk",
        }
    }
}

/// One of a worker's two terminals: its client, whether the server has greeted it (Hello
/// answered with the expected role), and when to try again after a failed connect.
struct Line {
    terminal: Terminal,
    client: Client,
    greeted: bool,
    retry_at: Option<Instant>,
}

struct Worker {
    index: usize,
    plan: Arc<Plan>,
    live: Arc<Live>,
    rng: Rng,
    cards: Vec<Card>,
    free: Vec<usize>,
    reader: Line,
    kiosk: Option<Line>,
    in_flight: FuturesUnordered<InFlight>,
    /// Per card: the balance change of its load request in flight, if any (what the reckoning
    /// must allow for should the request be abandoned unanswered).
    pending: Vec<Option<i64>>,
    stats: Stats,
    live_hist: Histogram<u64>,
    live_answered: u64,
    live_errors: u64,
    timeline: Option<Timeline>,
    next_slot: Option<Instant>,
    interval: Duration,
}

/// The client for one terminal of a worker: requests sent once (the tester counts a timeout
/// rather than retrying it), the plan's timeout for connect and answer, as many in flight as
/// the pipeline (within the client's ceiling), and no answer checks against the floor server.
fn line(terminal: Terminal, plan: &Plan) -> anyhow::Result<Line> {
    let mut config = terminal.config.clone();
    config.server.clone_from(&plan.addr);
    config.max_in_flight = plan.pipeline.clamp(1, citycard_client::MAX_IN_FLIGHT);
    let timeout_ms = plan.timeout.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
    config.connect_timeout_ms = timeout_ms;
    config.request_timeout_ms = timeout_ms;
    config.retry.attempts = 1;
    config.unchecked_answers_for_benchmarking = plan.floor;
    // As before the client crate: a timeout is counted, the connection stays.
    config.keep_connection_on_timeout = true;
    let client = Client::new(config).map_err(|e| anyhow!("terminal {}: {e}", terminal.id))?;
    Ok(Line { terminal, client, greeted: false, retry_at: None })
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
    let card_count = spec.cards.len();
    let free = (0..card_count).collect();
    let interval = match plan.worker_rate {
        Some(rate) if rate > 0.0 => Duration::from_secs_f64(1.0 / rate),
        _ => Duration::ZERO,
    };
    let reader = line(spec.reader, &plan);
    let kiosk = spec.kiosk.map(|k| line(k, &plan)).transpose();
    let (reader, kiosk) = match (reader, kiosk) {
        (Ok(r), Ok(k)) => (r, k),
        (Err(e), _) | (_, Err(e)) => {
            // Keep to the barrier, or the other workers would wait for this one forever.
            ready.wait().await;
            return Err(e);
        }
    };
    let mut w = Worker {
        index: spec.index,
        plan,
        live,
        rng: Rng::new(spec.seed),
        cards: spec.cards,
        free,
        reader,
        kiosk,
        in_flight: FuturesUnordered::new(),
        pending: vec![None; card_count],
        stats: Stats::new()?,
        live_hist: new_histogram()?,
        live_answered: 0,
        live_errors: 0,
        timeline: None,
        next_slot: None,
        interval,
    };
    w.greet(Side::Reader).await;
    w.greet(Side::Kiosk).await;
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
    w.stats.late_answers +=
        w.reader.client.late_answers() + w.kiosk.as_ref().map_or(0, |k| k.client.late_answers());
    Ok((w.stats, w.cards))
}

impl Worker {
    fn line(&self, side: Side) -> Option<&Line> {
        match side {
            Side::Reader => Some(&self.reader),
            Side::Kiosk => self.kiosk.as_ref(),
        }
    }

    fn line_mut(&mut self, side: Side) -> Option<&mut Line> {
        match side {
            Side::Reader => Some(&mut self.reader),
            Side::Kiosk => self.kiosk.as_mut(),
        }
    }

    fn error(&mut self, kind: impl Into<String>) {
        *self.stats.errors.entry(kind.into()).or_insert(0) += 1;
        self.live_errors += 1;
    }

    /// The side cannot be used until `RECONNECT_DELAY` from now.
    fn connect_failed(&mut self, side: Side, what: String) {
        if self.stats.first_connect_error.is_none() {
            self.stats.first_connect_error = Some(what);
        }
        self.error("connection failure (connect)");
        if let Some(line) = self.line_mut(side) {
            line.retry_at = Some(Instant::now() + RECONNECT_DELAY);
        }
    }

    /// Opens the side's connection with a Hello and checks the role the server sees.
    async fn greet(&mut self, side: Side) {
        let Some(line) = self.line(side) else {
            return;
        };
        let want_role = if side == Side::Reader { 1 } else { 2 };
        let id = line.terminal.id.clone();
        let result = async {
            let info = line.client.hello(now_ms()).await.map_err(|e| anyhow!("{id}: {e}"))?;
            if !self.plan.floor && info.role != want_role {
                bail!("terminal {id} has role {} at the server, expected {want_role}", info.role);
            }
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                if let Some(line) = self.line_mut(side) {
                    line.greeted = true;
                    line.retry_at = None;
                }
            }
            Err(e) => self.connect_failed(side, format!("{e:#}")),
        }
    }

    /// Whether requests may go to `side` now: greeted, and not waiting after a failed connect.
    fn usable(&self, side: Side, now: Instant) -> bool {
        self.line(side).is_some_and(|l| l.greeted && l.retry_at.is_none_or(|t| t <= now))
    }

    /// Builds a card request and starts it on its side's client; consuming requests advance
    /// the card's ATC.
    fn start(&mut self, card: usize, op: Op, amount: i64, mut tag: Tag) {
        let nonce = self.rng.next_u64();
        let Some(line) = self.line(tag.side) else {
            return;
        };
        let client = line.client.clone();
        let c = &mut self.cards[card];
        // An inquiry asks about the card's last answered consuming request, with its auth.
        let asked = match (op, c.transit.last) {
            (Op::Inquiry, Some((was, auth, amount))) => Some(request_of(was, auth, amount)),
            (Op::Inquiry, None) => return,
            _ => None,
        };
        let original = c.transit.purchase.map_or((Atc(0), Mac::default()), |(a, m, _)| (a, m));
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
            client.terminal_id(),
        );
        let auth = match &asked {
            Some(request) => *request.card_auth().unwrap_or(&CardAuth {
                card_id: c.id,
                atc: Atc(atc),
                nonce,
                cryptogram,
            }),
            None => CardAuth { card_id: c.id, atc: Atc(atc), nonce, cryptogram },
        };
        tag.auth = auth;
        // The floor's answers carry no MAC; everywhere else every MAC is checked.
        let key: Option<CardKey> = (!self.plan.floor).then(|| c.key.clone());
        tag.sent = Instant::now();
        self.in_flight.push(Box::pin(async move {
            let key = key.as_ref();
            let amount = Amount(amount);
            let outcome = match op {
                Op::Purchase => client.purchase(&auth, amount, key).await.map(Answer::Card),
                Op::TopUp => client.top_up(&auth, amount, key).await.map(Answer::Card),
                Op::Balance => client.balance(&auth, key).await.map(Answer::Card),
                Op::Identity => client.identity(&auth, key).await.map(Answer::Identity),
                Op::TapIn => client.tap_in(&auth, key).await.map(Answer::Transit),
                Op::TapOut => client.tap_out(&auth, amount, key).await.map(Answer::Transit),
                Op::Reversal => client
                    .reversal(&auth, amount, original.0, original.1, key)
                    .await
                    .map(Answer::Transit),
                Op::Inquiry => match &asked {
                    Some(request) => client.inquiry(request, key).await.map(Answer::Inquiry),
                    None => Err(ClientError::Mismatch("no request to inquire about")),
                },
            };
            (tag, outcome)
        }));
    }

    /// Starts as many requests as the pipeline depth, the free cards and (open loop) the
    /// schedule allow.
    fn refill(&mut self, now: Instant, timeline: &Timeline) {
        while self.in_flight.len() < self.plan.pipeline && !self.free.is_empty() {
            let intended = match self.next_slot {
                None => Instant::now(),
                Some(slot) if slot <= now + TIMER_SLACK && slot < timeline.deadline => slot,
                Some(_) => break,
            };
            let slot = self.rng.below(self.free.len() as u64) as usize;
            let card = self.free[slot];
            // The transit operations follow the card: a tap-in when it has no hold, else a
            // tap-out; a reversal only of a purchase it made; an inquiry only about a request.
            let transit = &self.cards[card].transit;
            let mut op = match self.plan.mix.pick(self.rng.next_u64()) {
                Op::TapIn if transit.hold => Op::TapOut,
                Op::TapOut if !transit.hold => Op::TapIn,
                Op::Reversal if transit.purchase.is_none() => Op::Purchase,
                Op::Inquiry if transit.last.is_none() => Op::Balance,
                other => other,
            };
            let reversed = transit.purchase.map_or(0, |(_, _, amount)| amount);
            let inquired_on_kiosk = transit.last.is_some_and(|(was, _, _)| was.on_kiosk());
            let mut amount = match op {
                Op::Purchase => self.rng.between(PURCHASE_AMOUNTS.0, PURCHASE_AMOUNTS.1),
                Op::TopUp => self.rng.between(TOPUP_AMOUNTS.0, TOPUP_AMOUNTS.1),
                Op::TapOut => self.rng.between(TAPOUT_FARES.0, TAPOUT_FARES.1),
                Op::Reversal => reversed,
                _ => 0,
            };
            if op == Op::TopUp && self.cards[card].reck.max() + amount > TOPUP_CEILING {
                op = Op::Purchase;
                amount = self.rng.between(PURCHASE_AMOUNTS.0, PURCHASE_AMOUNTS.1);
                self.stats.topups_skipped += 1;
            }
            // An inquiry goes out from the terminal that sent the request it asks about.
            let kiosk = op.on_kiosk() || (op == Op::Inquiry && inquired_on_kiosk);
            let side = if kiosk { Side::Kiosk } else { Side::Reader };
            if !self.usable(side, now) {
                // Down: wait for the reconnect (open loop: the schedule slips, which the
                // latency of later requests shows).
                break;
            }
            let tag =
                Tag { card, op, amount, intended, sent: now, verify: false, side, auth: NO_AUTH };
            self.start(card, op, amount, tag);
            self.pending[card] = Some(op.delta(amount));
            self.free.swap_remove(slot);
            self.stats.sent += 1;
            if let Some(slot) = self.next_slot.as_mut() {
                *slot += self.interval;
            }
        }
    }

    /// A request whose answer will never be trusted: the card leaves the load and its
    /// reckoning accepts either outcome.
    fn unknown_outcome(&mut self, tag: &Tag) {
        let card = &mut self.cards[tag.card];
        if !tag.verify {
            card.reck.unsure(tag.op.delta(tag.amount));
        }
        card.dead = true;
    }

    /// Handles one finished request, then every other one already finished, without waiting.
    fn on_done(&mut self, first: (Tag, Result<Answer, ClientError>)) {
        let mut next = Some(first);
        while let Some((tag, outcome)) = next.take() {
            self.answer(tag, outcome);
            // `now_or_never` polls with a no-op waker; the next `select!` polls the set again
            // with the task's own waker before waiting, so no wake-up is lost.
            next = self.in_flight.next().now_or_never().flatten();
        }
    }

    /// Latency runs from the request's intended time (open loop: its slot, so a late send
    /// counts against the server as wrk2 does) or from the actual send when that was earlier
    /// (a slot taken within [`TIMER_SLACK`] before its time).
    fn answer(&mut self, tag: Tag, outcome: Result<Answer, ClientError>) {
        let now = Instant::now();
        let verdict = judge(tag.op, outcome, self.plan.floor);
        self.pending[tag.card] = None;
        if tag.verify {
            self.verify_answer(&tag, verdict);
            return;
        }
        let (measured, in_window) = match &self.timeline {
            Some(t) => (
                tag.intended >= t.measure_start && tag.intended < t.deadline,
                now >= t.measure_start && now <= t.deadline,
            ),
            None => (false, false),
        };
        match verdict {
            Verdict::Answer { status, balance } => {
                if in_window {
                    self.stats.throughput_count += 1;
                }
                self.live_answered += 1;
                let start = tag.intended.min(tag.sent);
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
                let inquiry_failed = follow_transit(card, &tag, status);
                if let (true, Some(text)) = (plan_verify, inquiry_failed) {
                    self.stats.live_mismatch(text);
                }
                let card = &mut self.cards[tag.card];
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
            Verdict::NotSent { kind } => {
                // Nothing reached the server: the card stays in the load.
                self.connect_failed(tag.side, kind);
                self.stats.sent = self.stats.sent.saturating_sub(1);
                self.free.push(tag.card);
            }
            Verdict::Timeout => {
                self.stats.timeouts += 1;
                self.live_errors += 1;
                self.unknown_outcome(&tag);
            }
            Verdict::Failed { kind, bad_mac } => {
                if in_window {
                    self.stats.throughput_count += 1;
                }
                self.live_answered += 1;
                if bad_mac {
                    self.stats.bad_macs += 1;
                }
                if kind == "connection lost" {
                    let side = tag.side.name();
                    if self.stats.first_connect_error.is_none() {
                        let id = self.line(tag.side).map_or("", |l| l.terminal.id.as_str());
                        self.stats.first_connect_error = Some(format!("{id} ({side}): lost"));
                    }
                    self.error(format!("connection failure ({side} lost)"));
                } else {
                    self.error(kind);
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

    /// Greets the sides not yet greeted whose reconnect time has come.
    async fn greet_due(&mut self, now: Instant) {
        for side in [Side::Reader, Side::Kiosk] {
            let due =
                self.line(side).is_some_and(|l| !l.greeted && l.retry_at.is_some_and(|t| t <= now));
            if due {
                self.greet(side).await;
            }
        }
    }

    async fn load(&mut self, timeline: Timeline) {
        // A request sent just before the deadline may need a connect and then its answer,
        // each bounded by the timeout in the client.
        let drain_end = timeline.deadline + self.plan.timeout * 2;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::time::sleep_until(timeline.start).await;
        loop {
            let now = Instant::now();
            let sending = now < timeline.deadline;
            if sending {
                self.greet_due(now).await;
                self.refill(now, &timeline);
            } else if self.in_flight.is_empty() || now >= drain_end {
                break;
            }
            let wake = match self.next_slot {
                Some(slot)
                    if sending
                        && self.in_flight.len() < self.plan.pipeline
                        && !self.free.is_empty() =>
                {
                    slot.checked_sub(TIMER_SLACK).unwrap_or(slot).min(timeline.deadline)
                }
                _ if sending => timeline.deadline,
                _ => drain_end,
            };
            tokio::select! {
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.on_done(done);
                }
                _ = tokio::time::sleep_until(wake) => {}
                _ = tick.tick() => self.publish_live(),
            }
        }
        // Whatever is still unanswered waited at least the timeout (the client gives up on
        // each request after it, so this is only a guard).
        self.abandon_in_flight();
        if let Some(slot) = self.next_slot {
            if slot < timeline.deadline && !self.interval.is_zero() {
                let behind = (timeline.deadline - slot).as_secs_f64() / self.interval.as_secs_f64();
                self.stats.behind_schedule += behind.ceil() as u64;
            }
        }
    }

    /// Counts every request still in flight as timed out and drops it: its card leaves the
    /// load and its reckoning accepts either outcome.
    fn abandon_in_flight(&mut self) {
        let left = std::mem::take(&mut self.in_flight).len() as u64;
        self.stats.timeouts += left;
        self.live_errors += left;
        for (card, pending) in self.cards.iter_mut().zip(self.pending.iter_mut()) {
            if let Some(delta) = pending.take() {
                card.reck.unsure(delta);
                card.dead = true;
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
        let deadline = Instant::now() + self.plan.timeout * 4 + Duration::from_secs(total as u64);
        loop {
            let now = Instant::now();
            if !self.usable(Side::Reader, now) {
                attempts += 1;
                if attempts > 3 {
                    break;
                }
                tokio::time::sleep(RECONNECT_DELAY).await;
                self.greet(Side::Reader).await;
                continue;
            }
            while next < total && self.in_flight.len() < VERIFY_IN_FLIGHT {
                let tag = Tag {
                    card: next,
                    op: Op::Balance,
                    amount: 0,
                    intended: now,
                    sent: now,
                    verify: true,
                    side: Side::Reader,
                    auth: NO_AUTH,
                };
                self.start(next, Op::Balance, 0, tag);
                next += 1;
            }
            if (next >= total && self.in_flight.is_empty()) || now >= deadline {
                break;
            }
            tokio::select! {
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.on_done(done);
                }
                _ = tick.tick() => {}
            }
        }
        self.stats.verify_unchecked += (total - next.min(total)) as u64;
        let left = std::mem::take(&mut self.in_flight).len();
        self.stats.verify_unchecked += left as u64;
    }

    fn verify_answer(&mut self, tag: &Tag, verdict: Verdict) {
        let card = &self.cards[tag.card];
        match verdict {
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
            Verdict::Timeout => {
                self.stats.timeouts += 1;
                self.live_errors += 1;
                self.stats.verify_unchecked += 1;
            }
            Verdict::NotSent { kind } | Verdict::Failed { kind, bad_mac: false } => {
                self.stats.verify_unchecked += 1;
                self.error(format!("{kind} (balance check)"));
            }
            Verdict::Failed { kind, bad_mac: true } => {
                self.stats.bad_macs += 1;
                self.stats.verify_unchecked += 1;
                self.error(format!("{kind} (balance check)"));
            }
        }
    }
}
