//! `citycard promote`: after the operator promoted the DR site's PostgreSQL, raises the
//! generation in PostgreSQL (fencing the old primary: its commits now match no row, so it can
//! neither commit nor answer), takes in every record PostgreSQL holds, and records this data
//! directory as the primary of the new generation. Then `citycard serve` with `[replicate]`
//! pointing at this PostgreSQL serves terminals here.
//!
//! The order matters: the generation is raised first, under the row locks every commit of the
//! old primary takes, so no commit of the old generation can land after the catch-up read.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::schema::SCHEMA_LOCK;
use super::site::{Role, Site};
use super::standby::Follower;

pub struct PromoteOptions {
    pub source: String,
    pub ca: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub segment_bytes: u64,
}

/// What a promotion did.
#[derive(Debug)]
pub struct Promoted {
    pub generation: u64,
    /// `(shard, last seq, chain head)`.
    pub heads: Vec<(u16, u64, [u8; 32])>,
}

pub async fn promote(options: &PromoteOptions) -> anyhow::Result<Promoted> {
    let _lock = crate::layout::lock_data_dir(&options.data_dir)
        .context("stop the standby before promoting it")?;
    let site = Site::load(&options.data_dir)?;
    match site {
        Some(Site { role: Role::Standby, .. }) => {}
        Some(Site { role: Role::Primary, generation }) => {
            bail!("{} is already a primary (generation {generation})", options.data_dir.display())
        }
        None => bail!(
            "{} was never a standby (no {} file): nothing to promote",
            options.data_dir.display(),
            super::site::SITE_FILE
        ),
    }
    let plan = super::standby::plan(&options.source, options.ca.as_deref())?;
    let mut client = super::connect::connect(&plan).await?;
    let in_recovery: bool = client.query_one("SELECT pg_is_in_recovery()", &[]).await?.get(0);
    if in_recovery {
        bail!(
            "PostgreSQL at the DR site is still a standby: promote it first \
             (`pg_ctl promote -D ...` or `SELECT pg_promote()`), then run this again"
        );
    }
    let generation = fence(&mut client).await?;
    tracing::warn!(generation, "generation raised in postgresql: the old primary is fenced");
    let mut follower = follow_all(&options.data_dir, &client, options.segment_bytes).await?;
    follower.catch_up(&client).await?;
    let heads = follower.heads();
    drop(follower);
    Site { role: Role::Primary, generation }.store(&options.data_dir)?;
    Ok(Promoted { generation, heads })
}

async fn follow_all(
    data_dir: &Path,
    client: &tokio_postgres::Client,
    segment_bytes: u64,
) -> anyhow::Result<Follower> {
    Follower::open(data_dir, client, segment_bytes).await
}

/// Raises every shard's generation by one past the highest, waiting for the row locks that
/// in-flight commits of the old primary hold. Returns the new generation.
pub async fn fence(client: &mut tokio_postgres::Client) -> anyhow::Result<u64> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).await?;
    let rows = tx.query("SELECT generation FROM citycard_shard FOR UPDATE", &[]).await?;
    let Some(highest) = rows.iter().map(|r| r.get::<_, i64>(0)).max() else {
        bail!("PostgreSQL holds no citycard cluster");
    };
    let generation = highest + 1;
    tx.execute("UPDATE citycard_shard SET generation = $1", &[&generation]).await?;
    tx.commit().await?;
    Ok(generation as u64)
}
