//! The terminals a run uses: their discovery in a keys directory and their `citycard-client`
//! configuration. The connections themselves are [`citycard_client::Client`]s (mutual TLS 1.3
//! with the ring provider, pipelined by request id, answers and MACs checked).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

/// The single ALPN protocol spoken by citycard.
pub use citycard_client::ALPN;

/// A terminal identity: certificate file stem (= certificate CN = terminal id) and the client
/// configuration built from its certificate once (workers clone it and set their limits).
#[derive(Clone)]
pub struct Terminal {
    pub id: String,
    pub config: citycard_client::Config,
}

impl Terminal {
    /// Terminal `id` of the keys directory `keys` (`ca.pem`, `terminals/<id>.pem` and `.key`),
    /// talking to `addr`.
    pub fn load(keys: &Path, id: &str, addr: &str) -> anyhow::Result<Terminal> {
        let config = citycard_client::Config::from_keys_dir(addr, keys, id)
            .with_context(|| format!("client configuration of terminal {id}"))?;
        Ok(Terminal { id: id.to_owned(), config })
    }
}

/// Wall-clock milliseconds since the Unix epoch (the Hello's client time).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Terminal ids (certificate file stems) in `keys/terminals` whose name starts with `prefix`,
/// in numeric order of their suffix.
pub fn terminals_with_prefix(keys: &Path, prefix: &str) -> anyhow::Result<Vec<String>> {
    let dir = keys.join("terminals");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pem") {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if stem.starts_with(prefix) && path.with_extension("key").is_file() {
            ids.push(stem.to_owned());
        }
    }
    ids.sort_by_key(|id| {
        let digits: String = id.chars().rev().take_while(char::is_ascii_digit).collect();
        let n: u64 = digits.chars().rev().collect::<String>().parse().unwrap_or(0);
        (n, id.clone())
    });
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_discovery_orders_by_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let terminals = dir.path().join("terminals");
        std::fs::create_dir(&terminals).expect("mkdir");
        for id in ["reader-10", "reader-2", "reader-1", "kiosk-1", "counter-1"] {
            std::fs::write(terminals.join(format!("{id}.pem")), "").expect("pem");
            std::fs::write(terminals.join(format!("{id}.key")), "").expect("key");
        }
        std::fs::write(terminals.join("reader-3.pem"), "").expect("pem without key");
        let readers = terminals_with_prefix(dir.path(), "reader").expect("list");
        assert_eq!(readers, vec!["reader-1", "reader-2", "reader-10"]);
    }
}
