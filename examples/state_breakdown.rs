//! What a shard's derived state (sled) holds, by kind of key, against what it takes on disk:
//! `cargo run --release --example state_breakdown -- DATA_DIR` (the server must be stopped).
//! The figures for the README's disk footprint come from here and `du`.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Bytes on disk under `dir` (allocated blocks, like `du`).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

fn main() -> anyhow::Result<()> {
    let data: PathBuf = std::env::args().nth(1).context("usage: state_breakdown DATA_DIR")?.into();
    let shards: u16 = std::fs::read_to_string(data.join("shards"))?.trim().parse()?;
    for index in 0..shards {
        let dir = citycard::server::shard_dir(&data, index);
        let state = dir.join("state");
        let db = sled::Config::new().path(&state).open()?;
        // (count, key bytes, value bytes) per first key byte.
        let mut kinds: std::collections::BTreeMap<u8, (u64, u64, u64)> = Default::default();
        for item in db.iter() {
            let (k, v) = item?;
            let slot = kinds.entry(k.first().copied().unwrap_or(0)).or_default();
            slot.0 += 1;
            slot.1 += k.len() as u64;
            slot.2 += v.len() as u64;
        }
        let logical: u64 = kinds.values().map(|(_, k, v)| k + v).sum();
        println!(
            "shard {index}: state on disk {} bytes (sled size_on_disk {}), logical {} bytes, \
             journal {} bytes, archive {} bytes",
            disk_bytes(&state),
            db.size_on_disk()?,
            logical,
            disk_bytes(&dir.join("journal")),
            disk_bytes(&dir.join("archive"))
        );
        for (prefix, (count, key, value)) in kinds {
            println!(
                "  prefix {:?}: {count} keys, {key} key bytes, {value} value bytes",
                char::from(prefix)
            );
        }
    }
    Ok(())
}
