//! The data directory's layout, shared by the server, `verify` and the reports:
//!
//! | path | what |
//! |---|---|
//! | `LOCK` | held (flock) by the one process using the directory |
//! | `shards` | the shard count, fixed at creation (it decides which shard owns a card) |
//! | `archive` | optional: the archive root outside the data directory, fixed once set |
//! | `shard-N/` | one shard: `journal/`, `state/`, `checkpoint`, by default `archive/` |

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Holds `data/LOCK` for the life of the server or audit, so two processes never share a data
/// directory (sled would refuse the second one, which recovery must not mistake for damage).
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let path = data_dir.join("LOCK");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(_) => bail!(
            "data directory {} is in use by another citycard process (lock {})",
            data_dir.display(),
            path.display()
        ),
    }
}

/// Reads or records the shard count of a data directory: it decides which shard owns a card, so
/// it can never change for existing data.
pub fn shard_count(data_dir: &Path, wanted: Option<u16>) -> anyhow::Result<u16> {
    let path = data_dir.join("shards");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let existing: u16 = text
                .trim()
                .parse()
                .with_context(|| format!("{} does not hold a shard count", path.display()))?;
            if let Some(n) = wanted {
                if n != existing {
                    bail!(
                        "data directory {} was created with {existing} shards; --shards {n} cannot change that",
                        data_dir.display()
                    );
                }
            }
            Ok(existing)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let n = wanted.unwrap_or(cores.min(citycard_protocol::MAX_SHARDS) as u16);
            crate::durable_write(&path, format!("{n}\n").as_bytes())?;
            Ok(n)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn shard_dir(data_dir: &Path, index: u16) -> PathBuf {
    data_dir.join(format!("shard-{index}"))
}

/// File in the data directory naming an archive root outside it (absent: each shard archives
/// into `shard-N/archive`).
const ARCHIVE_ROOT_FILE: &str = "archive";

/// Records or checks where the data directory's archive lives, so that `verify` and settlement
/// reports find it without being told. Like the shard count, it cannot silently change: old
/// segments would be left behind where nothing reads them.
pub fn archive_root(data_dir: &Path, wanted: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    let path = data_dir.join(ARCHIVE_ROOT_FILE);
    let recorded = match std::fs::read_to_string(&path) {
        Ok(text) => Some(PathBuf::from(text.trim_end_matches('\n'))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match (recorded, wanted) {
        (Some(recorded), Some(wanted)) if recorded != wanted => bail!(
            "data directory {} archives to {}; --archive {} cannot change that (move the archive and edit {})",
            data_dir.display(),
            recorded.display(),
            wanted.display(),
            path.display()
        ),
        (Some(recorded), _) => Ok(Some(recorded)),
        (None, Some(wanted)) => {
            let text = wanted
                .to_str()
                .with_context(|| format!("archive path {} is not UTF-8", wanted.display()))?;
            crate::durable_write(&path, format!("{text}\n").as_bytes())?;
            Ok(Some(wanted.to_path_buf()))
        }
        (None, None) => Ok(None),
    }
}

/// Where shard `index` archives journal segments (see [`archive_root`]).
pub fn archive_dir(data_dir: &Path, root: Option<&Path>, index: u16) -> PathBuf {
    match root {
        Some(root) => root.join(format!("shard-{index}")),
        None => shard_dir(data_dir, index).join("archive"),
    }
}
