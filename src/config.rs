//! Server configuration: every limit with its default and the reason for it.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::engine::Limits;

/// Everything `citycard serve` can be told. Defaults are in [`Config::default`].
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`). Plain HTTP, allowed on loopback only,
    /// unless `admin_tls`.
    pub admin: SocketAddr,
    /// Serve the admin listener over mutual TLS (server certificate and CA of the keys
    /// directory, CRL applied); only `monitor` client certificates may read it. Required when
    /// `admin` is not a loopback address: metrics name terminals and reveal load, and plain
    /// HTTP on a network would hand them to anyone who can connect.
    pub admin_tls: bool,
    pub keys_dir: PathBuf,
    pub data_dir: PathBuf,
    /// Shards (worker threads, journals); None = number of cores. Fixed per data directory.
    pub shards: Option<u16>,
    /// Pin each shard thread to a core.
    pub pin_cores: bool,
    /// Optional CRL of revoked terminal certificates (PEM).
    pub crl: Option<PathBuf>,
    /// Most concurrent terminal connections: each costs a task, TLS state and buffers (~100 KiB
    /// worst case), so 4,096 bounds memory to well under 1 GiB.
    pub max_connections: usize,
    /// Requests in flight per connection; beyond it the server stops reading that socket
    /// (back-pressure). 64 covers a pipelining reader without letting one terminal fill a queue.
    pub max_in_flight: usize,
    /// TLS handshake must finish within this, or the connection is dropped.
    pub handshake_timeout_ms: u64,
    /// A connection with nothing in flight and no bytes for this long is closed.
    pub idle_timeout_ms: u64,
    /// A frame whose first byte arrived must be complete within this (slow-loris bound).
    pub frame_timeout_ms: u64,
    /// A reply that cannot be written within this closes the connection (stuck reader).
    pub write_timeout_ms: u64,
    /// Jobs queued per shard; a full queue answers Busy. 8,192 is ~8 batches of work.
    pub queue_depth: usize,
    /// Most jobs one group commit covers: bounds latency added to the first job of a batch.
    pub max_batch: usize,
    /// On SIGTERM, how long to wait for in-flight requests before closing connections.
    pub drain_timeout_ms: u64,
    pub limits: Limits,
    /// Key versions and the Unix ms after which cards on them are declined.
    pub key_cutoffs: Vec<(u16, u64)>,
    /// Journal segment size in bytes (preallocated).
    pub segment_bytes: u64,
    /// When each shard takes a checkpoint (bounds restart time, lets old segments be archived).
    pub checkpoint: crate::engine::CheckpointPolicy,
    /// Where journal segments below a checkpoint go: `DIR/shard-N`. None = `data/shard-N/archive`.
    pub archive_dir: Option<PathBuf>,
    /// Test seam: injected journal write/sync failures (shared by every shard). None in
    /// production.
    pub journal_faults: Option<std::sync::Arc<crate::journal::FaultInjector>>,
    /// `[replicate]`: every group commit also committed to PostgreSQL (synchronous streaming
    /// replication to the disaster-recovery site) before it is answered. None: one site only.
    pub replicate: Option<crate::replicate::ReplicateConfig>,
    /// `[[product]]` tables (protocol 1.3): the card products besides the built-in product 0,
    /// with their names. [`Config::from_layers`] copies their rules into `limits.products`.
    pub products: Vec<ProductConfig>,
}

/// One configured card product: its id, a name for people, and its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductConfig {
    pub id: u8,
    pub name: String,
    pub rules: crate::engine::product::Product,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            admin: SocketAddr::from(([127, 0, 0, 1], 7701)),
            admin_tls: false,
            keys_dir: PathBuf::from("keys"),
            data_dir: PathBuf::from("data"),
            shards: None,
            pin_cores: false,
            crl: None,
            max_connections: 4096,
            max_in_flight: 64,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 300_000,
            frame_timeout_ms: 10_000,
            write_timeout_ms: 10_000,
            queue_depth: 8192,
            max_batch: 1024,
            drain_timeout_ms: 10_000,
            limits: Limits::default(),
            key_cutoffs: Vec::new(),
            segment_bytes: 64 * 1024 * 1024,
            checkpoint: crate::engine::CheckpointPolicy::default(),
            archive_dir: None,
            journal_faults: None,
            replicate: None,
            products: Vec::new(),
        }
    }
}

impl Config {
    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_connections", self.max_connections as u64),
            ("max_in_flight", self.max_in_flight as u64),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("frame_timeout_ms", self.frame_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
            ("queue_depth", self.queue_depth as u64),
            ("max_batch", self.max_batch as u64),
            ("checkpoint_records", self.checkpoint.records),
            ("checkpoint_interval_ms", self.checkpoint.interval_ms),
            ("history_retention_days", u64::from(self.limits.history_retention_days)),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("{key} must be greater than 0"));
            }
        }
        // The card cache indexes its slots with u32; at about 90 bytes a card, 2^32 would be
        // far more memory than a shard should hold anyway.
        if self.limits.card_cache_entries == 0 || self.limits.card_cache_entries > u32::MAX as usize
        {
            return Err(format!("card_cache_entries must be 1..={}", u32::MAX));
        }
        if self.max_in_flight > usize::from(u16::MAX) {
            return Err("max_in_flight must be at most 65535".into());
        }
        if let Some(n) = self.shards {
            if n == 0 || usize::from(n) > citycard_protocol::MAX_SHARDS {
                return Err(format!("shards must be 1..={}", citycard_protocol::MAX_SHARDS));
            }
        }
        // A trillion currency units bounds every sum the engine forms far inside i64.
        const MONEY_LIMIT: i64 = 100_000_000_000_000;
        for (key, value) in
            [("max_balance", self.limits.max_balance), ("max_amount", self.limits.max_amount)]
        {
            if value <= 0 || value > MONEY_LIMIT {
                return Err(format!("{key} must be 1..={MONEY_LIMIT} minor units"));
            }
        }
        let t = &self.limits.transit;
        if t.max_fare <= 0 || t.max_fare > self.limits.max_amount {
            return Err("max_fare must be 1..=max_amount minor units".into());
        }
        if t.missing_tapout_fare < 0 || t.missing_tapout_fare > t.max_fare {
            return Err("missing_tapout_fare must be 0..=max_fare".into());
        }
        if t.hold_timeout_ms == 0 {
            return Err("hold_timeout_ms must be at least 1".into());
        }
        if self.segment_bytes < 64 * 1024 {
            return Err("segment_bytes must be at least 65536".into());
        }
        if let Some(replicate) = &self.replicate {
            replicate.validate()?;
        }
        self.validate_products()?;
        if !self.admin.ip().is_loopback() && !self.admin_tls {
            return Err(format!(
                "admin = {} is not a loopback address, and plain HTTP there would serve metrics \
                 to the network: set admin_tls = true (mutual TLS, monitor certificates only) \
                 or bind the admin listener to 127.0.0.1",
                self.admin
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The product table's rules (protocol 1.3): ids below MAX_PRODUCTS and each once, names
    /// of 1..=32 printable characters, every limit within the server-wide one it narrows.
    fn validate_products(&self) -> Result<(), String> {
        use crate::engine::product::{MAX_PRODUCTS, MAX_PRODUCT_NAME};
        let mut seen = [false; MAX_PRODUCTS];
        for p in &self.products {
            let at = format!("[[product]] id = {}", p.id);
            let Some(slot) = seen.get_mut(usize::from(p.id)) else {
                return Err(format!("{at}: product ids must be 0..={}", MAX_PRODUCTS - 1));
            };
            if std::mem::replace(slot, true) {
                return Err(format!("{at}: the id is given twice"));
            }
            let name_ok = !p.name.is_empty()
                && p.name.len() <= MAX_PRODUCT_NAME
                && p.name.chars().all(|c| !c.is_control());
            if !name_ok {
                return Err(format!(
                    "{at}: name must be 1..={MAX_PRODUCT_NAME} bytes of printable text"
                ));
            }
            let r = &p.rules;
            let within = [
                ("max_balance", r.max_balance, self.limits.max_balance, "max_balance"),
                ("max_amount", r.max_amount, self.limits.max_amount, "max_amount"),
                ("max_fare", r.max_fare, r.max_amount, "the product's max_amount"),
                ("deposit", r.deposit + 1, self.limits.max_balance + 1, "max_balance"),
            ];
            for (key, value, max, max_name) in within {
                if value < 1 || value > max {
                    return Err(format!("{at}: {key} must be within 1..={max_name} ({max})"));
                }
            }
            if r.daily_amount_limit.is_some_and(|v| v < 1) {
                return Err(format!(
                    "{at}: daily_amount_limit must be at least 1 (leave it out for none)"
                ));
            }
            if r.daily_count_limit == Some(0) {
                return Err(format!(
                    "{at}: daily_count_limit must be at least 1 (leave it out for none)"
                ));
            }
            if self.limits.products.configured(p.id) != Some(p.rules) {
                return Err(format!("{at}: not copied into the limits (use Config::from_layers)"));
            }
        }
        Ok(())
    }

    /// Copies the `[[product]]` rules into the engine's limits.
    pub fn apply_products(&mut self) {
        let mut table = crate::engine::product::Products::default();
        for p in &self.products {
            table.set(p.id, p.rules);
        }
        self.limits.products = table;
    }
}

/// One `[[product]]` table. Limits left out are the server-wide ones (`max_balance`,
/// `max_amount`, `max_fare`); daily limits left out are none.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductSettings {
    pub id: u8,
    pub name: String,
    pub max_balance: Option<i64>,
    pub max_amount: Option<i64>,
    pub daily_amount_limit: Option<i64>,
    pub daily_count_limit: Option<u32>,
    pub max_fare: Option<i64>,
    /// The refundable card deposit in minor units (0: none).
    pub deposit: i64,
    /// `"move"` (default: the deposit moves to the new card) or `"keep"` (the operator keeps
    /// the old card's deposit and the holder pays the deposit for the new card).
    pub replace_deposit: Option<String>,
}

/// One layer of settings: the TOML file, or the command line with environment variables (clap
/// merges those two). Every field is optional; a later layer wins. Unknown keys are refused so a
/// misspelt key fails at start instead of being ignored.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub admin_tls: Option<bool>,
    pub keys: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub shards: Option<u16>,
    pub pin_cores: Option<bool>,
    pub crl: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub max_in_flight: Option<usize>,
    pub handshake_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub frame_timeout_ms: Option<u64>,
    pub write_timeout_ms: Option<u64>,
    pub queue_depth: Option<usize>,
    pub max_batch: Option<usize>,
    pub drain_timeout_ms: Option<u64>,
    pub max_balance: Option<i64>,
    pub max_amount: Option<i64>,
    pub identity_ttl_ms: Option<u64>,
    /// Protocol 1.2 (config file only): the hold a tap-in places.
    pub max_fare: Option<i64>,
    /// Protocol 1.2: how long a hold waits for its tap-out.
    pub hold_timeout_ms: Option<u64>,
    /// Protocol 1.2: what a hold without a tap-out costs (at most max_fare).
    pub missing_tapout_fare: Option<i64>,
    /// Protocol 1.2: how long after a purchase its terminal may reverse it.
    pub reversal_window_ms: Option<u64>,
    pub key_cache_max: Option<usize>,
    pub card_cache_entries: Option<usize>,
    /// Days of history a History request is answered from online (older: BeyondRetention).
    pub history_retention_days: Option<u32>,
    pub segment_bytes: Option<u64>,
    pub checkpoint_records: Option<u64>,
    pub checkpoint_interval_ms: Option<u64>,
    pub archive: Option<PathBuf>,
    /// `[[key_cutoff]]` tables: `version` and `after_ms`.
    pub key_cutoff: Option<Vec<KeyCutoff>>,
    /// The `[replicate]` table (see [`crate::replicate::ReplicateSettings`]).
    pub replicate: Option<crate::replicate::ReplicateSettings>,
    /// `[[product]]` tables (protocol 1.3, config file only).
    pub product: Option<Vec<ProductSettings>>,
}

#[derive(Clone, Copy, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyCutoff {
    pub version: u16,
    pub after_ms: u64,
}

impl Settings {
    /// Reads a TOML file; errors name the file, the key and the reason.
    pub fn from_file(path: &std::path::Path) -> Result<Settings, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The `[[product]]` tables against the server-wide limits of `c` (all layers applied).
    fn products(&self, c: &Config) -> Result<Option<Vec<ProductConfig>>, String> {
        use crate::engine::product::{Product, ReplaceDeposit};
        let Some(tables) = &self.product else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(tables.len());
        for t in tables {
            let replace_deposit = match t.replace_deposit.as_deref() {
                None | Some("move") => ReplaceDeposit::Move,
                Some("keep") => ReplaceDeposit::Keep,
                Some(other) => {
                    return Err(format!(
                        "[[product]] id = {}: replace_deposit must be \"move\" or \"keep\", not {other:?}",
                        t.id
                    ))
                }
            };
            let max_amount = t.max_amount.unwrap_or(c.limits.max_amount);
            out.push(ProductConfig {
                id: t.id,
                name: t.name.clone(),
                rules: Product {
                    max_balance: t.max_balance.unwrap_or(c.limits.max_balance),
                    max_amount,
                    daily_amount_limit: t.daily_amount_limit,
                    daily_count_limit: t.daily_count_limit,
                    max_fare: t.max_fare.unwrap_or(c.limits.transit.max_fare.min(max_amount)),
                    deposit: t.deposit,
                    replace_deposit,
                },
            });
        }
        Ok(Some(out))
    }

    fn apply(&self, c: &mut Config) {
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field.clone() { c.$field = v; })* };
        }
        set!(listen, admin, max_connections, max_in_flight, handshake_timeout_ms, idle_timeout_ms);
        set!(frame_timeout_ms, write_timeout_ms, queue_depth, max_batch, drain_timeout_ms);
        set!(pin_cores, segment_bytes, admin_tls);
        if let Some(v) = &self.keys {
            c.keys_dir = v.clone();
        }
        if let Some(v) = &self.data {
            c.data_dir = v.clone();
        }
        if self.shards.is_some() {
            c.shards = self.shards;
        }
        if self.crl.is_some() {
            c.crl = self.crl.clone();
        }
        if let Some(v) = self.max_balance {
            c.limits.max_balance = v;
        }
        if let Some(v) = self.max_amount {
            c.limits.max_amount = v;
        }
        if let Some(v) = self.identity_ttl_ms {
            c.limits.identity_ttl_ms = v;
        }
        if let Some(v) = self.key_cache_max {
            c.limits.key_cache_max = v;
        }
        if let Some(v) = self.card_cache_entries {
            c.limits.card_cache_entries = v;
        }
        let t = &mut c.limits.transit;
        if let Some(v) = self.max_fare {
            t.max_fare = v;
        }
        if let Some(v) = self.hold_timeout_ms {
            t.hold_timeout_ms = v;
        }
        if let Some(v) = self.missing_tapout_fare {
            t.missing_tapout_fare = v;
        }
        if let Some(v) = self.reversal_window_ms {
            t.reversal_window_ms = v;
        }
        if let Some(v) = self.history_retention_days {
            c.limits.history_retention_days = v;
        }
        if let Some(v) = self.checkpoint_records {
            c.checkpoint.records = v;
        }
        if let Some(v) = self.checkpoint_interval_ms {
            c.checkpoint.interval_ms = v;
        }
        if self.archive.is_some() {
            c.archive_dir = self.archive.clone();
        }
        if let Some(cutoffs) = &self.key_cutoff {
            c.key_cutoffs = cutoffs.iter().map(|k| (k.version, k.after_ms)).collect();
        }
        if let Some(replicate) = &self.replicate {
            c.replicate = Some(replicate.apply(c.replicate.take()));
        }
    }
}

impl Config {
    /// Defaults, then each layer in order (file, then command line and environment), then
    /// validation.
    pub fn from_layers(layers: &[&Settings]) -> Result<Config, String> {
        let mut config = Config::default();
        for layer in layers {
            layer.apply(&mut config);
        }
        // Products last: their left-out limits are the server-wide ones of every layer.
        for layer in layers {
            if let Some(products) = layer.products(&config)? {
                config.products = products;
            }
        }
        config.apply_products();
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as TOML (what `citycard config show` prints). It holds no
    /// secret: keys live in files under `keys`, which are named, never read out.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        line("listen", format!("\"{}\"", self.listen));
        line("admin", format!("\"{}\"", self.admin));
        line("admin_tls", self.admin_tls.to_string());
        line("keys", format!("{:?}", self.keys_dir.display().to_string()));
        line("data", format!("{:?}", self.data_dir.display().to_string()));
        match self.shards {
            Some(n) => line("shards", n.to_string()),
            None => {
                line("# shards", "number of cores (fixed once the data directory exists)".into())
            }
        }
        line("pin_cores", self.pin_cores.to_string());
        if let Some(crl) = &self.crl {
            line("crl", format!("{:?}", crl.display().to_string()));
        }
        line("max_connections", self.max_connections.to_string());
        line("max_in_flight", self.max_in_flight.to_string());
        line("handshake_timeout_ms", self.handshake_timeout_ms.to_string());
        line("idle_timeout_ms", self.idle_timeout_ms.to_string());
        line("frame_timeout_ms", self.frame_timeout_ms.to_string());
        line("write_timeout_ms", self.write_timeout_ms.to_string());
        line("queue_depth", self.queue_depth.to_string());
        line("max_batch", self.max_batch.to_string());
        line("drain_timeout_ms", self.drain_timeout_ms.to_string());
        line("max_balance", self.limits.max_balance.to_string());
        line("max_amount", self.limits.max_amount.to_string());
        line("identity_ttl_ms", self.limits.identity_ttl_ms.to_string());
        line("key_cache_max", self.limits.key_cache_max.to_string());
        line("card_cache_entries", self.limits.card_cache_entries.to_string());
        let t = &self.limits.transit;
        line("max_fare", t.max_fare.to_string());
        line("hold_timeout_ms", t.hold_timeout_ms.to_string());
        line("missing_tapout_fare", t.missing_tapout_fare.to_string());
        line("reversal_window_ms", t.reversal_window_ms.to_string());
        line("history_retention_days", self.limits.history_retention_days.to_string());
        line("segment_bytes", self.segment_bytes.to_string());
        line("checkpoint_records", self.checkpoint.records.to_string());
        line("checkpoint_interval_ms", self.checkpoint.interval_ms.to_string());
        match &self.archive_dir {
            Some(dir) => line("archive", format!("{:?}", dir.display().to_string())),
            None => line("# archive", "data/shard-N/archive".into()),
        }
        line("# issuer and assertion keys", "read from the keys directory (never printed)".into());
        for (version, after_ms) in &self.key_cutoffs {
            out.push_str(&format!("[[key_cutoff]]\nversion = {version}\nafter_ms = {after_ms}\n"));
        }
        if let Some(replicate) = &self.replicate {
            out.push_str(&replicate.render());
        }
        for p in &self.products {
            let r = &p.rules;
            out.push_str(&format!(
                "[[product]]\nid = {}\nname = {:?}\nmax_balance = {}\nmax_amount = {}\n",
                p.id, p.name, r.max_balance, r.max_amount
            ));
            if let Some(v) = r.daily_amount_limit {
                out.push_str(&format!("daily_amount_limit = {v}\n"));
            }
            if let Some(v) = r.daily_count_limit {
                out.push_str(&format!("daily_count_limit = {v}\n"));
            }
            let rule = match r.replace_deposit {
                crate::engine::product::ReplaceDeposit::Move => "move",
                crate::engine::product::ReplaceDeposit::Keep => "keep",
            };
            out.push_str(&format!(
                "max_fare = {}\ndeposit = {}\nreplace_deposit = \"{rule}\"\n",
                r.max_fare, r.deposit
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_and_bad_values_name_the_key() {
        let file: Settings =
            toml::from_str("max_in_flight = 8\nidle_timeout_ms = 1000\n").unwrap_or_default();
        let cli = Settings { max_in_flight: Some(16), ..Settings::default() };
        let config = Config::from_layers(&[&file, &cli]).unwrap_or_default();
        assert_eq!((config.max_in_flight, config.idle_timeout_ms), (16, 1000));

        let zero = Settings { queue_depth: Some(0), ..Settings::default() };
        let err = Config::from_layers(&[&zero]).err().unwrap_or_default();
        assert!(err.contains("queue_depth"), "{err}");
        let unknown = toml::from_str::<Settings>("max_inflight = 3\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(unknown.contains("max_inflight"), "{unknown}");
        let wrong_type = toml::from_str::<Settings>("max_in_flight = \"many\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(wrong_type.contains("max_in_flight"), "{wrong_type}");
    }

    #[test]
    fn products_read_narrow_the_server_limits_and_bad_ones_are_named() {
        let text = "max_balance = 500000\n\
            [[product]]\nid = 1\nname = \"anonymous\"\nmax_balance = 100000\n\
            daily_count_limit = 3\ndeposit = 2000\nreplace_deposit = \"keep\"\n";
        let file: Settings = toml::from_str(text).unwrap_or_default();
        let config = Config::from_layers(&[&file]).unwrap_or_else(|e| panic!("{e}"));
        let p = config.limits.product(1).unwrap_or_else(|| panic!("product 1"));
        assert_eq!((p.max_balance, p.max_amount, p.max_fare), (100_000, 50_000, 400));
        assert_eq!((p.daily_count_limit, p.daily_amount_limit, p.deposit), (Some(3), None, 2_000));
        assert_eq!(p.replace_deposit, crate::engine::product::ReplaceDeposit::Keep);
        // Product 0 stays the server-wide limits; an unconfigured id is unknown.
        let zero = config.limits.product(0).unwrap_or_else(|| panic!("product 0"));
        assert_eq!((zero.max_balance, zero.deposit), (500_000, 0));
        assert!(config.limits.product(2).is_none());
        // The rendered config reads back the same table.
        let back: Settings = toml::from_str(&config.render()).unwrap_or_default();
        let back = Config::from_layers(&[&back]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.products, config.products);

        let bad = [
            ("[[product]]\nid = 32\nname = \"x\"\ndeposit = 0\n", "0..=31"),
            ("[[product]]\nid = 1\nname = \"x\"\ndeposit = 0\n[[product]]\nid = 1\nname = \"y\"\ndeposit = 0\n", "twice"),
            ("[[product]]\nid = 1\nname = \"\"\ndeposit = 0\n", "name"),
            ("[[product]]\nid = 1\nname = \"x\"\nmax_balance = 100001\ndeposit = 0\n", "max_balance"),
            ("[[product]]\nid = 1\nname = \"x\"\nmax_amount = 100\nmax_fare = 200\ndeposit = 0\n", "max_fare"),
            ("[[product]]\nid = 1\nname = \"x\"\ndeposit = -1\n", "deposit"),
            ("[[product]]\nid = 1\nname = \"x\"\ndeposit = 0\ndaily_count_limit = 0\n", "daily_count_limit"),
            ("[[product]]\nid = 1\nname = \"x\"\ndeposit = 0\nreplace_deposit = \"refund\"\n", "replace_deposit"),
        ];
        for (text, key) in bad {
            let err = toml::from_str::<Settings>(text)
                .map_err(|e| e.to_string())
                .and_then(|s| Config::from_layers(&[&s]).map(|_| ()))
                .err()
                .unwrap_or_default();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn admin_off_loopback_needs_tls() {
        let open = Settings { admin: "0.0.0.0:7701".parse().ok(), ..Settings::default() };
        let err = Config::from_layers(&[&open]).err().unwrap_or_default();
        assert!(err.contains("admin_tls"), "{err}");
        let tls = Settings { admin_tls: Some(true), ..open };
        assert!(Config::from_layers(&[&tls]).is_ok());
        let ipv6_loopback = Settings { admin: "[::1]:7701".parse().ok(), ..Settings::default() };
        assert!(Config::from_layers(&[&ipv6_loopback]).is_ok());
    }

    #[test]
    fn rendered_config_reads_back_the_same() {
        let config = Config {
            max_batch: 77,
            admin_tls: true,
            key_cutoffs: vec![(1, 5)],
            ..Config::default()
        };
        let text = config.render();
        let settings: Result<Settings, _> = toml::from_str(&text);
        let back = settings.map(|s| Config::from_layers(&[&s]));
        match back {
            Ok(Ok(back)) => {
                assert_eq!(back.max_batch, 77);
                assert!(back.admin_tls);
                assert_eq!(back.key_cutoffs, vec![(1, 5)]);
            }
            other => panic!("render did not round-trip: {other:?}\n{text}"),
        }
    }
}
