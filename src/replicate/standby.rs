//! `citycard standby`: follows the batches from the DR site's PostgreSQL (a read-only hot
//! standby) into a data directory of its own. Every record is checked (CRC, seq, hash chain,
//! the hash PostgreSQL holds) before it is appended, and a group commit is committed to the
//! local journal exactly where the primary committed it, so the records come out byte for byte
//! the primary's and `citycard verify` shows the same chain heads.
//!
//! Given the key set (`--keys`), the standby also brings the derived state (sled, checkpoint)
//! up to its journal every so many records ([`super::standby_state`]), so a promoted directory
//! replays only the records since; without it, the state is built from the whole journal when
//! the directory is first served (after `citycard promote`). The journal is the truth.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::connect::{self, Plan};
use super::site::{Role, Site};
use super::ReplicateError;
use crate::journal::{Journal, JournalOptions, RawRecord, RecordTail, Start};

/// Rows read per query: about a megabyte of records, a few milliseconds of PostgreSQL work.
const FETCH_ROWS: i64 = 4_096;
/// How often the standby asks for new records when it has caught up.
pub const DEFAULT_POLL_MS: u64 = 50;
/// Back-off after a failed connection or query.
const RETRY: Duration = Duration::from_millis(500);

/// One shard being followed.
pub struct Follow {
    pub index: u16,
    journal: Journal,
    /// Last seq and hash appended to the local journal.
    pub last_seq: u64,
    last_hash: [u8; 32],
    /// Records of a group commit whose end has not been read yet.
    pending: Vec<RawRecord>,
    /// PostgreSQL's head for this shard at the last look (for the lag).
    pub source_seq: Arc<AtomicU64>,
    pub applied_seq: Arc<AtomicU64>,
}

/// The shards of a standby data directory.
pub struct Follower {
    pub shards: Vec<Follow>,
    pub data_dir: PathBuf,
}

async fn shard_rows(client: &Client) -> Result<Vec<(u16, u16, u64, u64)>, ReplicateError> {
    let rows = client
        .query("SELECT shard, shards, generation, last_seq FROM citycard_shard ORDER BY shard", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i32>(0) as u16,
                r.get::<_, i32>(1) as u16,
                r.get::<_, i64>(2) as u64,
                r.get::<_, i64>(3) as u64,
            )
        })
        .collect())
}

impl Follower {
    /// Opens (creating) the standby's data directory against what PostgreSQL holds: the same
    /// shard count, and a journal that is a prefix of PostgreSQL's (its last record's hash is
    /// the one PostgreSQL holds at that seq).
    pub async fn open(
        data_dir: &Path,
        client: &Client,
        segment_bytes: u64,
    ) -> anyhow::Result<Follower> {
        let rows = shard_rows(client).await?;
        let Some(&(_, count, _, _)) = rows.first() else {
            // Retried by `run`: the primary founds the cluster at its first start.
            return Err(ReplicateError::Site(
                "PostgreSQL holds no citycard cluster yet: start the primary first".into(),
            )
            .into());
        };
        if rows.len() != usize::from(count) {
            bail!("PostgreSQL lists {} of {count} shards", rows.len());
        }
        let generation = rows.iter().map(|r| r.2).max().unwrap_or(0);
        crate::layout::shard_count(data_dir, Some(count))?;
        match Site::load(data_dir)? {
            Some(Site { role: Role::Primary, .. }) => bail!(
                "{} is a primary's data directory; a standby needs a directory of its own",
                data_dir.display()
            ),
            Some(Site { role: Role::Standby, generation: ours }) if ours > generation => bail!(
                "this standby followed generation {ours}, PostgreSQL records {generation}: \
                 it is not the database this standby followed"
            ),
            _ => Site { role: Role::Standby, generation }.store(data_dir)?,
        }
        let mut shards = Vec::new();
        let archive_root = crate::layout::archive_root(data_dir, None)?;
        for &(index, _, _, source) in &rows {
            let shard_dir = crate::layout::shard_dir(data_dir, index);
            let dir = shard_dir.join("journal");
            let archive = crate::layout::archive_dir(data_dir, archive_root.as_deref(), index);
            // A state build archives the segments below its checkpoint: read from the
            // checkpoint when there is one (the segments from it on are in `journal/`).
            let checkpoint = crate::engine::checkpoint::Checkpoint::load(&shard_dir).ok().flatten();
            let start = match &checkpoint {
                Some(cp) => Start::Anchor(cp.anchor()),
                None => Start::Full { archive: Some(&archive) },
            };
            let options = JournalOptions { segment_bytes, ..Default::default() };
            let journal = Journal::open_from(&dir, options, start, |_, _| Ok(()))
                .with_context(|| format!("opening {}", dir.display()))?;
            let last_seq = journal.last_committed_seq();
            let last_hash = journal.last_hash();
            if last_seq > 0 {
                let row = client
                    .query_opt(
                        "SELECT hash FROM citycard_journal WHERE shard = $1 AND seq = $2",
                        &[&i32::from(index), &(last_seq as i64)],
                    )
                    .await?;
                let theirs: Option<Vec<u8>> = row.map(|r| r.get(0));
                if theirs.as_deref() != Some(&last_hash[..]) {
                    bail!(
                        "shard {index}: this standby's record {last_seq} is not the one PostgreSQL \
                         holds; it followed another primary (start from an empty directory)"
                    );
                }
            }
            shards.push(Follow {
                index,
                journal,
                last_seq,
                last_hash,
                pending: Vec::new(),
                source_seq: Arc::new(AtomicU64::new(source)),
                applied_seq: Arc::new(AtomicU64::new(last_seq)),
            });
        }
        Ok(Follower { shards, data_dir: data_dir.to_path_buf() })
    }

    /// Reads what PostgreSQL has beyond each shard's journal (at most one page per shard) and
    /// appends every complete group commit. Returns the records appended.
    pub async fn poll(&mut self, client: &Client) -> anyhow::Result<u64> {
        let heads = shard_rows(client).await?;
        let mut appended = 0;
        for follow in &mut self.shards {
            if let Some(head) = heads.iter().find(|h| h.0 == follow.index) {
                follow.source_seq.store(head.3, Ordering::Release);
            }
            appended += follow.poll(client).await?;
        }
        Ok(appended)
    }

    /// Follows until every shard's journal has what PostgreSQL held when this was called.
    pub async fn catch_up(&mut self, client: &Client) -> anyhow::Result<()> {
        loop {
            self.poll(client).await?;
            let behind =
                self.shards.iter().any(|f| f.last_seq < f.source_seq.load(Ordering::Acquire));
            if !behind {
                return Ok(());
            }
        }
    }

    /// `(shard, last seq, hash of the last record)` for every shard.
    pub fn heads(&self) -> Vec<(u16, u64, [u8; 32])> {
        self.shards.iter().map(|f| (f.index, f.last_seq, f.last_hash)).collect()
    }
}

impl Follow {
    async fn poll(&mut self, client: &Client) -> anyhow::Result<u64> {
        let after = self.last_seq + self.pending.len() as u64;
        let rows = client
            .query(super::schema::FOLLOW, &[&i32::from(self.index), &(after as i64), &FETCH_ROWS])
            .await?;
        let mut appended = 0;
        for row in rows {
            let seq = row.get::<_, i64>(0) as u64;
            let batch_end: bool = row.get(1);
            let bytes: Vec<u8> = row.get(2);
            let hash: Vec<u8> = row.get(3);
            let record = RawRecord::check(bytes)
                .map_err(|why| anyhow::anyhow!("shard {} seq {seq}: {why}", self.index))?;
            let expected = self.last_seq + self.pending.len() as u64 + 1;
            let prev = self.pending.last().map_or(self.last_hash, |r| r.hash);
            let batch_start = self.pending.first().map_or(expected, |r| r.seq);
            let problem = if record.seq != seq || seq != expected {
                Some(format!("expected seq {expected}, got {seq} (record says {})", record.seq))
            } else if record.prev_hash != prev {
                Some("its previous-record hash breaks the chain".to_owned())
            } else if record.hash[..] != hash[..] {
                Some("its hash differs from the one PostgreSQL holds".to_owned())
            } else if record.batch_start != batch_start {
                Some(format!(
                    "batch starts at {} but the group commit began at {batch_start}",
                    record.batch_start
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                bail!("shard {} seq {seq}: {problem}; refusing to follow", self.index);
            }
            self.pending.push(record);
            if batch_end {
                appended += self.commit_pending()?;
            }
        }
        Ok(appended)
    }

    /// Appends one whole group commit and syncs it; the local journal must produce the very
    /// records the primary wrote (checked by hash).
    fn commit_pending(&mut self) -> anyhow::Result<u64> {
        let batch = std::mem::take(&mut self.pending);
        for record in &batch {
            let seq = self.journal.append(record.payload())?;
            if seq != record.seq || self.journal.last_hash() != record.hash {
                bail!(
                    "shard {} seq {}: the local journal wrote a different record",
                    self.index,
                    record.seq
                );
            }
        }
        self.journal.commit()?;
        if let Some(last) = batch.last() {
            self.last_seq = last.seq;
            self.last_hash = last.hash;
            self.applied_seq.store(last.seq, Ordering::Release);
        }
        Ok(batch.len() as u64)
    }
}

/// Options of `citycard standby`.
pub struct StandbyOptions {
    pub source: String,
    pub ca: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub poll_ms: u64,
    /// Loopback address for `/metrics` and `/readyz` of the standby (lag per shard).
    pub admin: Option<std::net::SocketAddr>,
    pub segment_bytes: u64,
    /// Keep the derived state up while following (`--keys`); None: journal only.
    pub state: Option<super::standby_state::StateBuild>,
}

/// Runs the standby until `stop` is cancelled. Connection failures are retried; a record that
/// fails its checks stops the standby (it never appends what it cannot prove).
pub async fn run(options: StandbyOptions, stop: CancellationToken) -> anyhow::Result<()> {
    let _lock = crate::layout::lock_data_dir(&options.data_dir)?;
    let plan = connect::plan_for(&options.source, options.ca.as_deref(), 3_000)?;
    let status =
        Arc::new(std::sync::Mutex::new(Vec::<(u16, Arc<AtomicU64>, Arc<AtomicU64>)>::new()));
    if let Some(admin) = options.admin {
        spawn_admin(admin, status.clone()).await?;
    }
    let mut follower: Option<Follower> = None;
    let poll = Duration::from_millis(options.poll_ms.max(1));
    // Records appended since the derived state was last built (or since the start).
    let mut since_build = 0u64;
    let mut last_log = std::time::Instant::now();
    while !stop.is_cancelled() {
        let client = match connect::connect(&plan).await {
            Ok(client) => client,
            Err(e) => {
                crate::metrics::METRICS.replication_failure();
                tracing::warn!(error = %e, "standby cannot reach postgresql; retrying");
                sleep_or_stop(RETRY, &stop).await;
                continue;
            }
        };
        if follower.is_none() {
            match Follower::open(&options.data_dir, &client, options.segment_bytes).await {
                Ok(f) => {
                    if let Ok(mut s) = status.lock() {
                        *s = f
                            .shards
                            .iter()
                            .map(|x| (x.index, x.applied_seq.clone(), x.source_seq.clone()))
                            .collect();
                    }
                    for (index, seq, hash) in f.heads() {
                        tracing::info!(shard = index, last_seq = seq, head = %crate::hex::encode(&hash), "standby opened");
                    }
                    follower = Some(f);
                }
                Err(e) if e.downcast_ref::<ReplicateError>().is_some() => {
                    tracing::warn!(error = %e, "standby cannot read postgresql; retrying");
                    sleep_or_stop(RETRY, &stop).await;
                    continue;
                }
                Err(e) if e.downcast_ref::<tokio_postgres::Error>().is_some() => {
                    tracing::warn!(error = %e, "standby cannot read postgresql; retrying");
                    sleep_or_stop(RETRY, &stop).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let Some(f) = follower.as_mut() else { continue };
        while !stop.is_cancelled() {
            match f.poll(&client).await {
                Ok(0) => sleep_or_stop(poll, &stop).await,
                Ok(n) => since_build += n,
                Err(e)
                    if e.downcast_ref::<tokio_postgres::Error>().is_some()
                        || e.downcast_ref::<ReplicateError>().is_some() =>
                {
                    crate::metrics::METRICS.replication_failure();
                    tracing::warn!(error = %e, "standby lost postgresql; reconnecting");
                    sleep_or_stop(RETRY, &stop).await;
                    break;
                }
                Err(e) => return Err(e),
            }
            if options.state.as_ref().is_some_and(|s| since_build >= s.every_records.max(1)) {
                break;
            }
            if last_log.elapsed() >= Duration::from_secs(10) {
                last_log = std::time::Instant::now();
                for s in &f.shards {
                    let lag = s.source_seq.load(Ordering::Acquire).saturating_sub(s.last_seq);
                    tracing::info!(
                        shard = s.index,
                        applied_seq = s.last_seq,
                        lag_records = lag,
                        "standby following"
                    );
                }
            }
        }
        if let Some(state) =
            options.state.as_ref().filter(|s| since_build >= s.every_records.max(1))
        {
            // Close the journals (one writer at a time), build, and follow on from the
            // checkpoint the build wrote.
            follower = None;
            build_state(state, &options.data_dir).await?;
            since_build = 0;
        }
    }
    if let Some(f) = &follower {
        for (index, seq, hash) in f.heads() {
            tracing::info!(shard = index, last_seq = seq, head = %crate::hex::encode(&hash), "standby stopped");
        }
    }
    // A clean stop (before a promotion, normally) leaves the state at the journal's end.
    drop(follower);
    if let Some(state) = &options.state {
        build_state(state, &options.data_dir).await?;
    }
    Ok(())
}

/// Builds the derived state off the async threads, with the follower's journals closed.
async fn build_state(
    state: &super::standby_state::StateBuild,
    data_dir: &Path,
) -> anyhow::Result<()> {
    let (state, dir) = (state.clone(), data_dir.to_path_buf());
    let started = std::time::Instant::now();
    let reports = tokio::task::spawn_blocking(move || state.build(&dir))
        .await
        .map_err(|e| anyhow::anyhow!("the state build stopped: {e}"))??;
    for (index, r) in reports.iter().enumerate() {
        tracing::info!(
            shard = index,
            last_seq = r.last_seq,
            replayed = r.replayed,
            rebuilt_state = r.rebuilt_state,
            cards = r.cards,
            "standby derived state built"
        );
    }
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "standby derived state up to the journal"
    );
    Ok(())
}

async fn sleep_or_stop(d: Duration, stop: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.cancelled() => {}
    }
}

type Status = Arc<std::sync::Mutex<Vec<(u16, Arc<AtomicU64>, Arc<AtomicU64>)>>>;

/// `/metrics` (applied seq and lag per shard) and `/readyz` (following) on loopback.
async fn spawn_admin(addr: std::net::SocketAddr, status: Status) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!("the standby's admin listener is plain HTTP: bind it to loopback");
    }
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "standby admin listener (metrics, readyz)");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let status = status.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let shards: Vec<(u16, u64, u64)> = status
                    .lock()
                    .map(|s| {
                        s.iter()
                            .map(|(i, a, src)| {
                                (*i, a.load(Ordering::Acquire), src.load(Ordering::Acquire))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let (code, body) = match path {
                    "/metrics" => ("200 OK", standby_metrics(&shards)),
                    "/readyz" if !shards.is_empty() => ("200 OK", "following\n".to_owned()),
                    "/readyz" => ("503 Service Unavailable", "not following yet\n".to_owned()),
                    _ => ("404 Not Found", "not found\n".to_owned()),
                };
                let head = format!(
                    "HTTP/1.1 {code}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(())
}

fn standby_metrics(shards: &[(u16, u64, u64)]) -> String {
    let mut out = String::new();
    out.push_str("# HELP citycard_standby_applied_seq Last journal seq the standby appended\n");
    out.push_str("# TYPE citycard_standby_applied_seq gauge\n");
    for (i, applied, _) in shards {
        out.push_str(&format!("citycard_standby_applied_seq{{shard=\"{i}\"}} {applied}\n"));
    }
    out.push_str("# HELP citycard_standby_lag_records Records PostgreSQL holds that the standby has not appended\n");
    out.push_str("# TYPE citycard_standby_lag_records gauge\n");
    for (i, applied, source) in shards {
        out.push_str(&format!(
            "citycard_standby_lag_records{{shard=\"{i}\"}} {}\n",
            source.saturating_sub(*applied)
        ));
    }
    out
}

/// The chain head of a journal directory: (last seq, hash of the last record), for `verify`.
pub fn chain_head(journal: &Path, archive: &Path, last_seq: u64) -> Option<[u8; 32]> {
    if last_seq == 0 {
        return Some([0; 32]);
    }
    let mut tail = RecordTail::open_at(journal, archive, last_seq).ok()?;
    tail.read_next().ok().map(|r| r.hash)
}

/// Used by the `promote` path: the plan for a connection string given on the command line.
pub fn plan(source: &str, ca: Option<&Path>) -> Result<Plan, ReplicateError> {
    connect::plan_for(source, ca, 3_000)
}
