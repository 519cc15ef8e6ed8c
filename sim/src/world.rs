//! The simulated world: the shards on one in-memory disk, the clock, the reference ledger, and
//! the step loop that commits, injects faults, crashes, restarts and checks the invariants.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use citycard::engine::decide::transit::TransitLimits;
use citycard::engine::{
    CheckpointPolicy, Limits, Op, Output, RebuildReason, Secrets, Shard, ShardOptions, Stepped,
};
use citycard::journal::{Background, DiskFault, JournalOptions, ManualBackground, MemDisk};
use citycard_protocol::{CardId, KeyVersion};

use crate::effect::Change;
use crate::effect::Effect;
use crate::model::{
    Hold, Model, HOLD_TIMEOUT_MS, MAX_AMOUNT, MAX_BALANCE, MAX_FARE, MISSING_TAPOUT_FARE,
    REVERSAL_WINDOW_MS,
};
use crate::replication::Replication;
use crate::rng::Rng;
use crate::{Config, Failure};

/// Shards of the simulated server (two: routing and per-shard commits matter, and more only
/// costs time per step).
pub const SHARDS: u16 = 2;
/// Small segments, so rotation, preallocation and torn batches across segments happen often;
/// each seed picks one.
const SEGMENT_BYTES: [u64; 3] = [8 * 1024, 16 * 1024, 64 * 1024];
/// The simulated clock's start (2023-11-14), and the identity assertion validity.
const EPOCH_MS: u64 = 1_700_000_000_000;
pub const IDENTITY_TTL_MS: u64 = 5 * 60 * 1000;
/// Lost answers the terminals still mean to retry (older ones are given up).
const UNANSWERED_MAX: usize = 64;
/// Holds the sweep settles per call, as the worker's between-batch sweep (more than the sim's
/// cards, so every due hold is settled before the next batch).
const SWEEP_MAX: usize = 4096;

/// What a crash does to sled (derived state, on real files next to the in-memory journal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SledFate {
    /// sled keeps everything it was given (the process died, the page cache did not).
    Keep,
    /// sled loses what it wrote since the last snapshot (an unflushed tail).
    Rewind,
    /// sled is gone: the state is rebuilt from the journal.
    Wipe,
}

pub struct World {
    pub config: Config,
    pub rng: Rng,
    pub root: tempfile::TempDir,
    pub disk: MemDisk,
    secrets: Arc<Secrets>,
    background: Arc<ManualBackground>,
    pub shards: Vec<Option<Shard>>,
    pub now_ms: u64,
    segment_bytes: u64,
    /// What the engine acknowledged.
    pub model: Model,
    /// The acknowledged ledger plus the current batch's answers (not yet acknowledged).
    pub pending: Model,
    /// The current batch's effects, in execution order.
    pub batch: Vec<Effect>,
    /// The sim's card counters: the highest ATC each card has produced (never goes back).
    pub counters: BTreeMap<CardId, u32>,
    pub op_refs: BTreeMap<String, u64>,
    /// Requests whose answer was lost with a failed batch (the terminal retries them).
    pub unanswered: Vec<(String, citycard_protocol::Request)>,
    /// The current batch's requests (lost if the batch is).
    pub inflight: Vec<(String, citycard_protocol::Request)>,
    pub trace: ring::digest::Context,
    pub step: u64,
    pub transactions: u64,
    pub crashes: u64,
    pub faults: u64,
    /// Whether a snapshot of sled exists to rewind to.
    snapshot: bool,
    /// Whether the last crash wiped sled (a rebuild is then expected).
    wiped: bool,
    /// The shards' replication to the simulated PostgreSQL.
    pub repl: Replication,
    /// The current batch's answers by shard, handed to replication with their group commit.
    pub step_answers: Vec<(u16, String, citycard_protocol::Request, Vec<u8>)>,
}

fn fail(world: &World, message: String) -> Failure {
    Failure { seed: world.config.seed, step: world.step, inject: world.config.inject, message }
}

impl World {
    pub fn new(config: Config) -> Result<World, Failure> {
        let mut rng = Rng::new(config.seed);
        let root = tempfile::tempdir().map_err(|e| Failure::setup(&config, e))?;
        std::fs::write(root.path().join("shards"), format!("{SHARDS}\n"))
            .map_err(|e| Failure::setup(&config, e))?;
        let disk = MemDisk::new(rng.fork());
        let mut issuer = [0u8; 32];
        issuer.iter_mut().for_each(|b| *b = rng.below(256) as u8);
        let mut signing = [0u8; 32];
        signing.iter_mut().for_each(|b| *b = rng.below(256) as u8);
        let assertion = ring::signature::Ed25519KeyPair::from_seed_unchecked(&signing)
            .map_err(|e| Failure::setup(&config, std::io::Error::other(e.to_string())))?;
        let secrets = Arc::new(Secrets {
            issuer: BTreeMap::from([(1, issuer)]),
            current_version: KeyVersion(1),
            retire_after_ms: BTreeMap::new(),
            assertion,
        });
        let mut world = World {
            config,
            rng,
            root,
            disk,
            secrets,
            background: Arc::new(ManualBackground::new()),
            shards: (0..SHARDS).map(|_| None).collect(),
            now_ms: EPOCH_MS,
            segment_bytes: 0,
            model: Model::default(),
            pending: Model::default(),
            batch: Vec::new(),
            counters: BTreeMap::new(),
            op_refs: BTreeMap::new(),
            unanswered: Vec::new(),
            inflight: Vec::new(),
            trace: ring::digest::Context::new(&ring::digest::SHA256),
            step: 0,
            transactions: 0,
            crashes: 0,
            faults: 0,
            snapshot: false,
            wiped: false,
            repl: Replication::new(&[0; SHARDS as usize]),
            step_answers: Vec::new(),
        };
        world.segment_bytes = SEGMENT_BYTES[world.rng.index(SEGMENT_BYTES.len())];
        world.open_all()?;
        Ok(world)
    }

    pub fn fail(&self, message: impl Into<String>) -> Failure {
        fail(self, message.into())
    }

    pub fn shard_dir(&self, index: u16) -> PathBuf {
        self.root.path().join(format!("shard-{index}"))
    }

    pub(crate) fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    pub(crate) fn secrets(&self) -> Arc<Secrets> {
        self.secrets.clone()
    }

    /// The options every simulated shard opens with (the failover site's too).
    pub(crate) fn shard_options(
        &self,
        index: u16,
        dir: PathBuf,
        storage: citycard::journal::Storage,
        background: Option<Arc<dyn Background>>,
    ) -> ShardOptions {
        ShardOptions {
            index,
            count: SHARDS,
            dir,
            journal: JournalOptions {
                segment_bytes: self.segment_bytes,
                storage,
                background,
                ..Default::default()
            },
            limits: Limits {
                max_balance: MAX_BALANCE,
                max_amount: MAX_AMOUNT,
                identity_ttl_ms: IDENTITY_TTL_MS,
                transit: TransitLimits {
                    max_fare: MAX_FARE,
                    hold_timeout_ms: HOLD_TIMEOUT_MS,
                    missing_tapout_fare: MISSING_TAPOUT_FARE,
                    reversal_window_ms: REVERSAL_WINDOW_MS,
                },
                ..Limits::default()
            },
            checkpoint: CheckpointPolicy { records: 300, ..CheckpointPolicy::default() },
            archive: None,
        }
    }

    fn open_all(&mut self) -> Result<(), Failure> {
        for index in 0..SHARDS {
            let options = self.shard_options(
                index,
                self.shard_dir(index),
                self.disk.storage(),
                Some(self.background.clone() as Arc<dyn Background>),
            );
            let (shard, report) = Shard::open(options, self.secrets.clone())
                .map_err(|e| self.fail(format!("shard {index} did not open: {e}")))?;
            match &report.rebuild {
                None => {}
                // sled held nothing yet (wiped, or nothing was handed to it before the crash).
                Some(RebuildReason::Missing) => {}
                Some(reason) => {
                    return Err(self.fail(format!(
                        "shard {index} rebuilt its state although the simulator did not damage \
                         it: {reason}"
                    )))
                }
            }
            let mut shard = shard;
            // sled lags behind the journal until the simulator steps it; a crash drops the
            // jobs not yet stepped, as a killed process loses sled's unwritten batches.
            shard
                .set_write_behind(Box::new(Stepped::default()))
                .map_err(|e| self.fail(format!("shard {index}: write-behind: {e}")))?;
            self.shards[usize::from(index)] = Some(shard);
        }
        self.wiped = false;
        Ok(())
    }

    pub fn shard(&mut self, index: u16) -> Result<&mut Shard, Failure> {
        let step = self.step;
        let seed = self.config.seed;
        let inject = self.config.inject;
        self.shards[usize::from(index)].as_mut().ok_or(Failure {
            seed,
            step,
            inject,
            message: format!("shard {index} is not open"),
        })
    }

    pub fn execute(&mut self, index: u16, terminal: &str, op: Op<'_>) -> Result<Output, Failure> {
        let now = self.now_ms;
        self.transactions += 1;
        let shard = self.shard(index)?;
        let out = shard.execute(terminal, op, now);
        out.map_err(|e| self.fail(format!("shard {index} failed to execute: {e}")))
    }

    pub fn hash(&mut self, bytes: &[u8]) {
        self.trace.update(&(bytes.len() as u64).to_le_bytes());
        self.trace.update(bytes);
    }

    /// One step: a batch of terminal traffic, then the commits (with a fault now and then),
    /// then maybe a crash, a clock jump, a snapshot of sled; then the invariants.
    pub fn run_step(&mut self) -> Result<(), Failure> {
        self.step += 1;
        self.hash(&self.step.to_le_bytes());
        self.pending = self.model.clone();
        self.batch.clear();
        self.inflight.clear();
        self.step_answers.clear();
        if (0..SHARDS).any(|s| self.repl.refusing(s)) {
            // Replication is stalled: the workers refuse card work Unavailable without
            // deciding it, and the terminals come back later (none is sent this step).
            self.hash(b"refused");
            self.repl.refused_steps += 1;
        } else {
            let commands = 1 + self.rng.below(8);
            for _ in 0..commands {
                self.command()?;
            }
        }
        if self.rng.chance(8) {
            // Power fails with the batch decided but not committed: nothing was acknowledged.
            self.hash(b"crash-before-commit");
            let survivors = BTreeMap::new();
            return self.crash(&survivors);
        }
        let armed = self.rng.chance(25);
        if armed {
            self.arm_fault();
        }
        let mut survivors = BTreeMap::new();
        let mut failed = false;
        for index in 0..SHARDS {
            if failed {
                break;
            }
            let shipped = self.shard(index)?.pending_bytes().to_vec();
            let result = self.shard(index)?.commit();
            match result {
                Ok(()) => {
                    let answers = self
                        .step_answers
                        .iter()
                        .filter(|a| a.0 == index)
                        .map(|a| (a.1.clone(), a.2.clone(), a.3.clone()))
                        .collect();
                    self.hand_over(index, &shipped, answers)?;
                    let acked: Vec<Effect> =
                        self.batch.iter().filter(|e| e.shard == index).cloned().collect();
                    for e in &acked {
                        self.model.apply(e);
                    }
                }
                Err(e) => {
                    self.hash(format!("commit-failed-{index}").as_bytes());
                    if !armed {
                        return Err(self.fail(format!("commit failed without a fault: {e}")));
                    }
                    failed = true;
                    survivors.insert(index, ());
                }
            }
        }
        self.disk.disarm();
        self.disk.set_capacity(None);
        if failed {
            // Fail-stop: the server stops; the operator restarts it.
            return self.crash(&survivors);
        }
        self.batch.clear();
        self.inflight.clear();
        let now_ms = self.now_ms;
        for index in 0..SHARDS {
            let shard = self.shard(index)?;
            let result = shard.persist_due(now_ms);
            result.map_err(|e| self.fail(format!("persist_due: {e}")))?;
            // sled catches up now and then, by one chunk.
            if self.rng.chance(300) {
                let shard = self.shard(index)?;
                let result = shard.persist_step();
                result.map_err(|e| self.fail(format!("persist_step: {e}")))?;
            }
        }
        if self.rng.chance(30) {
            self.background.run_all();
        }
        if self.rng.chance(10) {
            self.take_snapshot()?;
        }
        if self.rng.chance(12) {
            self.hash(b"crash");
            self.crash(&BTreeMap::new())?;
        }
        self.advance_clock();
        self.sweep()?;
        self.replicate()?;
        if self.rng.chance(5) {
            self.catch_up()?;
        }
        if self.rng.chance(5) {
            self.failover()?;
        }
        self.check()
    }

    /// The worker's hold sweep after the clock moved, committed: every hold whose timeout
    /// passed is settled at the missing tap-out fare, and no other.
    fn sweep(&mut self) -> Result<(), Failure> {
        let now = self.now_ms;
        for index in 0..SHARDS {
            let due: Vec<_> = self
                .model
                .cards
                .iter()
                .filter(|(_, c)| c.shard == index)
                .filter_map(|(id, c)| c.settle_fare(now, false).map(|f| (*id, c.balance - f, f)))
                .collect();
            let shard = self.shard(index)?;
            let settled = shard.expire_holds(now, SWEEP_MAX).and_then(|n| {
                let shipped = shard.pending_bytes().to_vec();
                shard.commit().map(|()| (n, shipped))
            });
            let (settled, shipped) = settled.map_err(|e| self.fail(format!("hold sweep: {e}")))?;
            self.hand_over(index, &shipped, Vec::new())?;
            if settled != due.len() {
                return Err(self.fail(format!(
                    "shard {index}: the sweep settled {settled} holds, {} were due",
                    due.len()
                )));
            }
            for (id, balance, fare) in due {
                let changes = vec![
                    Change::Balance(id, balance),
                    Change::Hold(id, None),
                    Change::MoneyOut(fare),
                    Change::Op(id),
                ];
                self.model.apply(&Effect { shard: index, seq: 0, changes });
            }
            if settled > 0 {
                self.hash(format!("swept-{index}-{settled}").as_bytes());
            }
        }
        Ok(())
    }

    fn advance_clock(&mut self) {
        let tick = 1 + self.rng.below(40);
        self.now_ms += tick;
        self.repl.clock_ms += tick;
        if self.rng.chance(5) {
            // A jump: an hour to ten days (NTP step, a suspended VM).
            self.now_ms += 3_600_000 * (1 + self.rng.below(240));
            self.hash(b"clock-jump");
        }
        if self.rng.chance(15) {
            // About the hold timeout, so some holds just expire and others just do not.
            self.now_ms += HOLD_TIMEOUT_MS - 60_000 + self.rng.below(120_000);
            self.hash(b"clock-jump-hold");
        } else if self.rng.chance(10) {
            // About the reversal window.
            self.now_ms += REVERSAL_WINDOW_MS - 30_000 + self.rng.below(60_000);
            self.hash(b"clock-jump-window");
        }
    }

    fn arm_fault(&mut self) {
        self.faults += 1;
        let fault = match self.rng.below(4) {
            0 => DiskFault::FailSync(EIO),
            1 => DiskFault::TearWrite,
            2 => DiskFault::FailWrite(EIO),
            _ => {
                // Full disk: nothing more fits (bites when the batch needs a new segment).
                self.disk.set_capacity(Some(self.disk.used()));
                self.hash(b"fault-enospc");
                return;
            }
        };
        self.hash(format!("fault-{fault:?}").as_bytes());
        self.disk.arm(fault);
    }

    /// Stops every shard as a power failure would, loses what the disk had not synced, does
    /// something to sled, and restarts. Records of the failed batch that survived recovery on
    /// the shards in `failed` join the acknowledged ledger (their answer was lost, not undone).
    fn crash(&mut self, failed: &BTreeMap<u16, ()>) -> Result<(), Failure> {
        self.crashes += 1;
        // The terminals whose answers were lost retry them later.
        let lost = std::mem::take(&mut self.inflight);
        self.unanswered.extend(lost);
        let excess = self.unanswered.len().saturating_sub(UNANSWERED_MAX);
        self.unanswered.drain(..excess);
        for shard in &mut self.shards {
            drop(shard.take());
        }
        self.disk.crash();
        self.disk.set_capacity(None);
        let fate = match self.rng.below(6) {
            0 if self.snapshot => SledFate::Rewind,
            1 => SledFate::Wipe,
            _ => SledFate::Keep,
        };
        self.hash(format!("sled-{fate:?}").as_bytes());
        match fate {
            SledFate::Keep => {}
            SledFate::Rewind => {
                for index in 0..SHARDS {
                    let dir = self.shard_dir(index);
                    let snap = self.root.path().join(format!("snapshot-{index}"));
                    // sled never goes back past a flush it finished, and a checkpoint is taken
                    // only after one: rewind only a shard that took no checkpoint since.
                    let checkpoint = |d: &Path| std::fs::read(d.join("checkpoint")).ok();
                    if checkpoint(&dir) != checkpoint(&snap) {
                        continue;
                    }
                    restore(&snap, &dir).map_err(|e| self.fail(format!("rewind sled: {e}")))?;
                }
            }
            SledFate::Wipe => {
                for index in 0..SHARDS {
                    let dir = self.shard_dir(index);
                    let _ = std::fs::remove_dir_all(dir.join("state"));
                    let _ = std::fs::remove_file(dir.join("checkpoint"));
                }
                self.snapshot = false;
                self.wiped = true;
            }
        }
        self.open_all()?;
        // Which records of the failed batch survived: those up to each shard's recovered end.
        let batch = std::mem::take(&mut self.batch);
        for effect in &batch {
            if !failed.contains_key(&effect.shard) || effect.seq == 0 {
                continue;
            }
            let last = self.last_seq(effect.shard)?;
            if effect.seq <= last {
                self.model.apply(effect);
            }
        }
        self.pending = self.model.clone();
        self.restart_replication()
    }

    pub(crate) fn last_seq(&mut self, index: u16) -> Result<u64, Failure> {
        // The journal's end is what the disk holds; read it from the disk, as the auditor does.
        let dir = self.shard_dir(index).join("journal");
        let archive = self.shard_dir(index).join("archive");
        let storage = self.disk.storage();
        let start = citycard::journal::Start::Full { archive: Some(&archive) };
        citycard::journal::read_from_on(&storage, &dir, start, |_, _| Ok(()))
            .map(|s| s.last_seq)
            .map_err(|e| self.fail(format!("reading shard {index}'s journal: {e}")))
    }

    /// Makes sled hold everything and copies it (and the checkpoint) aside: the state a later
    /// crash may rewind sled to.
    fn take_snapshot(&mut self) -> Result<(), Failure> {
        for index in 0..SHARDS {
            let shard = self.shard(index)?;
            let done = shard.persist().and_then(|()| shard.flush_state());
            done.map_err(|e| self.fail(format!("persist for a snapshot: {e}")))?;
            let dir = self.shard_dir(index);
            let snap = self.root.path().join(format!("snapshot-{index}"));
            let _ = std::fs::remove_dir_all(&snap);
            copy_tree(&dir, &snap).map_err(|e| self.fail(format!("snapshot: {e}")))?;
        }
        self.snapshot = true;
        Ok(())
    }

    /// The invariants after a step.
    pub fn check(&mut self) -> Result<(), Failure> {
        // Money is conserved: the sum of balances is what came in minus what went out.
        let expected = self.model.money_in - self.model.money_out;
        if self.model.balances() != expected {
            return Err(self.fail("the reference ledger itself does not balance (sim bug)"));
        }
        let mut engine_sum = 0i64;
        for index in 0..SHARDS {
            let shard = self.shards[usize::from(index)].as_ref();
            let Some(shard) = shard else { return Err(self.fail("shard not open")) };
            let listed = match shard.cards() {
                Ok(listed) => listed,
                Err(e) => return Err(self.fail(format!("cannot list the shard's cards: {e}"))),
            };
            type Seen = (i64, bool, Option<Hold>);
            let cards: BTreeMap<CardId, Seen> = listed
                .into_iter()
                .map(|(id, c)| {
                    let h = c.hold;
                    let hold = h.is_open().then_some(Hold {
                        atc: h.atc.0,
                        amount: h.amount.0,
                        expires_ms: h.expires_ms,
                    });
                    (id, (c.balance.0, c.hotlisted().is_some(), hold))
                })
                .collect();
            let model: BTreeMap<CardId, Seen> = self
                .model
                .cards
                .iter()
                .filter(|(_, c)| c.shard == index)
                .map(|(id, c)| (*id, (c.balance, c.hotlisted(), c.hold)))
                .collect();
            if cards != model {
                let diff: Vec<String> = model
                    .iter()
                    .filter(|(id, m)| cards.get(id) != Some(m))
                    .map(|(id, m)| format!("{id:?}: ledger {m:?}, engine {:?}", cards.get(id)))
                    .chain(
                        cards
                            .iter()
                            .filter(|(id, _)| !model.contains_key(id))
                            .map(|(id, c)| format!("{id:?}: engine only {c:?}")),
                    )
                    .take(5)
                    .collect();
                return Err(self.fail(format!(
                    "shard {index}: engine cards differ from the acknowledged ledger: {}",
                    diff.join("; ")
                )));
            }
            engine_sum += cards.values().map(|c| c.0).sum::<i64>();
        }
        if engine_sum != expected {
            return Err(self.fail(format!(
                "money not conserved: balances {engine_sum}, in - out = {expected}"
            )));
        }
        if self.step.is_multiple_of(16) {
            self.check_hotlist()?;
        }
        Ok(())
    }

    /// Every shard's hotlist, replayed from version 0, lists exactly its hotlisted cards.
    pub fn check_hotlist(&mut self) -> Result<(), Failure> {
        for index in 0..SHARDS {
            let mut since = 0;
            let mut listed: BTreeMap<CardId, bool> = BTreeMap::new();
            loop {
                let out = self.execute(index, "monitor-1", Op::Hotlist { since, max: 512 })?;
                let Output::Hotlist { version, entries, more } = out else {
                    return Err(self.fail("hotlist answered with another output"));
                };
                for e in &entries {
                    listed.insert(e.card_id, e.listed);
                }
                since = version;
                if !more {
                    break;
                }
            }
            let listed: Vec<CardId> =
                listed.into_iter().filter(|(_, l)| *l).map(|(id, _)| id).collect();
            let expected: Vec<CardId> = self
                .model
                .cards
                .iter()
                .filter(|(_, c)| c.shard == index && c.hotlisted())
                .map(|(id, _)| *id)
                .collect();
            if listed != expected {
                return Err(self.fail(format!(
                    "shard {index}: hotlist {listed:?} but hotlisted cards {expected:?}"
                )));
            }
        }
        Ok(())
    }

    /// The end of a run: everything to sled, the shards stopped, the disk copied onto real
    /// files, and the offline auditor run over the data directory.
    pub fn finish(&mut self) -> Result<(), Failure> {
        self.check_hotlist()?;
        self.catch_up()?;
        self.check_store_is_journal()?;
        self.failover()?;
        self.check_fenced()?;
        for index in 0..SHARDS {
            let shard = self.shard(index)?;
            shard.persist().map_err(|e| self.fail(format!("final persist: {e}")))?;
        }
        for shard in &mut self.shards {
            drop(shard.take());
        }
        for (path, bytes) in self.disk.files() {
            let parent = path.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(parent)
                .and_then(|()| std::fs::write(&path, bytes))
                .map_err(|e| self.fail(format!("copying {} off the disk: {e}", path.display())))?;
        }
        let report = citycard::verify::verify(self.root.path())
            .map_err(|e| self.fail(format!("verify could not run: {e}")))?;
        if !report.ok() {
            return Err(self.fail(format!("verify found problems: {:?}", report.problems)));
        }
        Ok(())
    }
}

/// EIO on Linux (the only platform the journal supports).
const EIO: i32 = 5;

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "journal" || name == "archive" {
            continue; // on the in-memory disk, not here
        }
        let target = to.join(&name);
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn restore(snapshot: &Path, dir: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(dir.join("state"));
    let _ = std::fs::remove_file(dir.join("checkpoint"));
    copy_tree(snapshot, dir)
}
