//! The PostgreSQL side: two tables, the statement that commits a run of batches, and the start
//! checks that decide the generation (the fence).
//!
//! `citycard_shard` has one row per shard: the generation allowed to write it, and the head of
//! what PostgreSQL holds (`last_seq`, `last_hash`). `citycard_journal` holds every journal record
//! byte for byte (header and payload), keyed by (shard, seq), with its SHA-256 and whether it
//! ends its group commit (so a standby commits its own journal at the same boundaries and its
//! records come out byte-identical).

use tokio_postgres::{Client, Statement};

use super::site::{Role, Site};
use super::ReplicateError;

/// Serialises schema creation and generation changes between shard tasks, primaries and
/// `promote` (an arbitrary constant: "citycard" on a phone keypad).
pub const SCHEMA_LOCK: i64 = 24_892_273;

pub const CREATE: &str = "
CREATE TABLE IF NOT EXISTS citycard_shard (
    shard integer PRIMARY KEY,
    shards integer NOT NULL,
    generation bigint NOT NULL,
    last_seq bigint NOT NULL,
    last_hash bytea NOT NULL,
    last_commit_ms bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS citycard_journal (
    shard integer NOT NULL,
    seq bigint NOT NULL,
    batch_end boolean NOT NULL,
    record bytea NOT NULL,
    hash bytea NOT NULL,
    PRIMARY KEY (shard, seq)
);";

/// Commits records `$2+1 ..= $3` of shard `$1`: the head row moves only from the seq it is at
/// (`$2`) and only under the writer's generation (`$6`); otherwise nothing is inserted and the
/// statement reports 0 rows. The row lock the UPDATE takes is what `promote` waits for, so no
/// commit of the old generation can land after the fence.
pub const COMMIT: &str = "
WITH head AS (
    UPDATE citycard_shard
       SET last_seq = $3, last_hash = $4,
           last_commit_ms = (extract(epoch from clock_timestamp()) * 1000)::bigint
     WHERE shard = $1 AND last_seq = $2 AND generation = $5
 RETURNING shard
)
INSERT INTO citycard_journal (shard, seq, batch_end, record, hash)
SELECT head.shard, t.seq, t.batch_end, t.record, t.hash
  FROM head, unnest($6::bigint[], $7::boolean[], $8::bytea[], $9::bytea[])
       AS t(seq, batch_end, record, hash)";

pub const HEAD: &str =
    "SELECT generation, last_seq, last_hash, last_commit_ms FROM citycard_shard WHERE shard = $1";

/// Records after a seq, for a standby (read-only; works on a hot standby).
pub const FOLLOW: &str = "SELECT seq, batch_end, record, hash FROM citycard_journal \
                          WHERE shard = $1 AND seq > $2 ORDER BY seq LIMIT $3";

/// The head of one shard in PostgreSQL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub generation: u64,
    pub last_seq: u64,
    pub last_hash: [u8; 32],
    pub last_commit_ms: u64,
}

pub async fn head(client: &Client, shard: u16) -> Result<Option<Head>, ReplicateError> {
    let row = client.query_opt(HEAD, &[&i32::from(shard)]).await?;
    Ok(row.map(|row| {
        let hash: Vec<u8> = row.get(2);
        let mut last_hash = [0u8; 32];
        if hash.len() == 32 {
            last_hash.copy_from_slice(&hash);
        }
        Head {
            generation: row.get::<_, i64>(0) as u64,
            last_seq: row.get::<_, i64>(1) as u64,
            last_hash,
            last_commit_ms: row.get::<_, i64>(3) as u64,
        }
    }))
}

pub async fn prepare_commit(client: &Client) -> Result<Statement, ReplicateError> {
    Ok(client.prepare(COMMIT).await?)
}

/// The generation a primary writes under, decided once at start: creates the tables, founds
/// the cluster (generation 1) when PostgreSQL holds none, adds missing shard rows, and refuses
/// a data directory that another site's promotion has fenced or that was never part of this
/// cluster. Writes the site file before the rows, so a crash between them repeats the same
/// founding at the next start.
pub async fn establish(
    client: &mut Client,
    data_dir: &std::path::Path,
    shards: u16,
) -> Result<u64, ReplicateError> {
    let site = Site::load(data_dir)?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).await?;
    tx.batch_execute(CREATE).await?;
    let row = tx
        .query_one(
            "SELECT count(*), coalesce(max(generation), 0), coalesce(min(generation), 0), \
             coalesce(max(shards), 0) FROM citycard_shard",
            &[],
        )
        .await?;
    let (rows, max_gen, min_gen, recorded_shards) = (
        row.get::<_, i64>(0),
        row.get::<_, i64>(1) as u64,
        row.get::<_, i64>(2) as u64,
        row.get::<_, i32>(3),
    );
    let generation = match site {
        Some(Site { role: Role::Standby, .. }) => {
            return Err(ReplicateError::Site(
                "this data directory is a standby: run `citycard promote` before serving".into(),
            ))
        }
        None if rows > 0 => {
            return Err(ReplicateError::Site(format!(
                "PostgreSQL already holds a citycard cluster (generation {max_gen}) and this data \
                 directory was never part of it: start it as a standby (`citycard standby`) or \
                 point replicate.conninfo at an empty database"
            )))
        }
        None => {
            Site { role: Role::Primary, generation: 1 }.store(data_dir)?;
            tracing::warn!("founding a new replicated cluster in PostgreSQL (generation 1)");
            1
        }
        Some(Site { generation, .. }) => generation,
    };
    if rows > 0 {
        if max_gen > generation {
            return Err(ReplicateError::Fenced { shard: 0, ours: generation, found: max_gen });
        }
        if min_gen < generation || max_gen < generation {
            return Err(ReplicateError::Diverged {
                shard: 0,
                reason: format!(
                    "PostgreSQL records generation {min_gen}..={max_gen}, older than this data \
                     directory's {generation}: it is not the database this site was promoted on"
                ),
            });
        }
        if recorded_shards != i32::from(shards) {
            return Err(ReplicateError::Config(format!(
                "PostgreSQL records {recorded_shards} shards, this data directory has {shards}"
            )));
        }
    }
    for shard in 0..shards {
        tx.execute(
            "INSERT INTO citycard_shard (shard, shards, generation, last_seq, last_hash, \
             last_commit_ms) VALUES ($1, $2, $3, 0, $4, 0) ON CONFLICT (shard) DO NOTHING",
            &[&i32::from(shard), &i32::from(shards), &(generation as i64), &vec![0u8; 32]],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(generation)
}
