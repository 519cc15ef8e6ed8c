//! The `[replicate]` configuration section: where PostgreSQL is, how long a stall may last, and
//! whether answers wait for it.

use std::path::PathBuf;

/// Whether answers wait for PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// An answer waits for the local sync and the PostgreSQL commit (the default): no
    /// acknowledged transaction is lost with either site.
    Sync,
    /// Answers go out after the local sync; PostgreSQL follows behind. A lost primary site then
    /// loses the transactions acknowledged but not yet replicated. Logged loudly at start.
    AsyncUnsafe,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::AsyncUnsafe => "async-unsafe",
        }
    }
}

/// Default stall bound: a terminal's own answer timeout is a few seconds, and an Unavailable
/// within one second leaves it time to retry or go offline before its user gives up.
pub const DEFAULT_STALL_MS: u64 = 1_000;
/// How long one connection attempt may take (TCP, TLS, authentication).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3_000;

/// The effective replication settings.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplicateConfig {
    /// libpq-style connection string (`host=... port=... user=... dbname=...`) or URL. May hold
    /// a password, so it is never logged or rendered whole.
    pub conninfo: String,
    /// PEM file of the CA that signed PostgreSQL's server certificate. Required (and TLS used)
    /// when a host in `conninfo` is not loopback.
    pub ca: Option<PathBuf>,
    /// An answer waiting longer than this for PostgreSQL is sent as Unavailable instead, and card
    /// requests are refused Unavailable until replication has caught up.
    pub stall_ms: u64,
    pub connect_timeout_ms: u64,
    pub mode: Mode,
}

impl std::fmt::Debug for ReplicateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicateConfig")
            .field("conninfo", &redact(&self.conninfo))
            .field("ca", &self.ca)
            .field("stall_ms", &self.stall_ms)
            .field("mode", &self.mode)
            .finish()
    }
}

/// The connection string without its password (for logs and `config show`).
pub fn redact(conninfo: &str) -> String {
    if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        // user:password@host: drop what lies between ':' and '@' in the authority.
        if let Some((scheme, rest)) = conninfo.split_once("://") {
            if let Some((auth, host)) = rest.split_once('@') {
                let user = auth.split(':').next().unwrap_or("");
                return format!("{scheme}://{user}@{host}");
            }
        }
        return conninfo.to_owned();
    }
    conninfo
        .split_whitespace()
        .map(|kv| if kv.starts_with("password=") { "password=***" } else { kv })
        .collect::<Vec<_>>()
        .join(" ")
}

impl ReplicateConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.conninfo.trim().is_empty() {
            return Err("replicate.conninfo must name the PostgreSQL primary".into());
        }
        if self.stall_ms == 0 || self.stall_ms > 60_000 {
            return Err("replicate.stall_ms must be 1..=60000".into());
        }
        if self.connect_timeout_ms == 0 {
            return Err("replicate.connect_timeout_ms must be greater than 0".into());
        }
        super::connect::plan(self).map(|_| ()).map_err(|e| e.to_string())
    }

    pub fn render(&self) -> String {
        let mut out = String::from("[replicate]\n");
        out.push_str(&format!("conninfo = {:?}\n", redact(&self.conninfo)));
        if let Some(ca) = &self.ca {
            out.push_str(&format!("ca = {:?}\n", ca.display().to_string()));
        }
        out.push_str(&format!("stall_ms = {}\n", self.stall_ms));
        out.push_str(&format!("connect_timeout_ms = {}\n", self.connect_timeout_ms));
        out.push_str(&format!("mode = \"{}\"\n", self.mode.label()));
        out
    }
}

/// The `[replicate]` table as written in the TOML file.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicateSettings {
    pub conninfo: Option<String>,
    pub ca: Option<PathBuf>,
    pub stall_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub mode: Option<Mode>,
}

impl ReplicateSettings {
    /// This layer over an earlier one (or the defaults).
    pub fn apply(&self, earlier: Option<ReplicateConfig>) -> ReplicateConfig {
        let mut c = earlier.unwrap_or(ReplicateConfig {
            conninfo: String::new(),
            ca: None,
            stall_ms: DEFAULT_STALL_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            mode: Mode::Sync,
        });
        if let Some(v) = &self.conninfo {
            c.conninfo = v.clone();
        }
        if self.ca.is_some() {
            c.ca = self.ca.clone();
        }
        if let Some(v) = self.stall_ms {
            c.stall_ms = v;
        }
        if let Some(v) = self.connect_timeout_ms {
            c.connect_timeout_ms = v;
        }
        if let Some(v) = self.mode {
            c.mode = v;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_render() {
        assert_eq!(redact("host=a password=sekrit user=b"), "host=a password=*** user=b");
        assert_eq!(redact("postgres://u:sekrit@h:5/db"), "postgres://u@h:5/db");
    }

    #[test]
    fn section_parses_and_off_loopback_needs_a_ca() {
        let text = "[replicate]\nconninfo = \"host=127.0.0.1 port=5432 user=c dbname=c\"\n\
                    mode = \"async-unsafe\"\n";
        let settings: crate::config::Settings = toml::from_str(text).unwrap_or_default();
        let config = crate::config::Config::from_layers(&[&settings]);
        let replicate = config.ok().and_then(|c| c.replicate);
        assert_eq!(replicate.as_ref().map(|r| r.mode), Some(Mode::AsyncUnsafe));
        assert_eq!(replicate.map(|r| r.stall_ms), Some(DEFAULT_STALL_MS));

        let remote = "[replicate]\nconninfo = \"host=10.1.2.3 user=c dbname=c\"\n";
        let settings: crate::config::Settings = toml::from_str(remote).unwrap_or_default();
        let err = crate::config::Config::from_layers(&[&settings]).err().unwrap_or_default();
        assert!(err.contains("replicate.ca"), "{err}");
        let unknown = toml::from_str::<crate::config::Settings>("[replicate]\nconnifo = \"x\"\n");
        assert!(unknown.is_err());
    }
}
