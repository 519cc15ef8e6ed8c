//! Live TLS trust: the server configs new handshakes use (rebuilt and swapped on SIGHUP), the
//! registry of open terminal connections with their certificate serial and expiry, and the CRL
//! reload that closes the connections of newly revoked terminals.
//!
//! A reload builds everything first (CRL checked against the CA, both configs); only when all
//! of it succeeded is the new state swapped in. A bad CRL therefore leaves the old trust in
//! force: the caller logs the error and `/metrics` counts it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::keys::{self, KeysError};
use crate::metrics::METRICS;
use crate::tls::{self, CertificateFacts};

/// Most terminals that get their own certificate-expiry series on `/metrics`: the soonest to
/// expire are shown. Each terminal id is a label value, so without a bound a fleet of 4,096
/// connected terminals would be 4,096 series per scrape; 100 is what a dashboard table can
/// show and what an expiry alert needs (the soonest ones).
pub const MAX_TERMINAL_EXPIRY_SERIES: usize = 100;

/// What new handshakes are checked against. Replaced as a whole by a reload.
struct Current {
    terminal: Arc<ServerConfig>,
    /// Present when the admin listener serves TLS.
    admin: Option<Arc<ServerConfig>>,
    /// Serials (canonical hex) in the CRL in force; empty without a CRL.
    revoked: Arc<HashSet<String>>,
    server: CertificateFacts,
    ca: CertificateFacts,
}

/// One open terminal connection as the reload sees it.
struct Live {
    terminal: String,
    certificate: CertificateFacts,
    close: CancellationToken,
}

pub struct Trust {
    keys_dir: PathBuf,
    crl: Option<PathBuf>,
    admin_tls: bool,
    /// Read once per accepted connection and per scrape, written only by a reload: never held
    /// across an await, and a reader only clones an `Arc` out of it.
    current: RwLock<Arc<Current>>,
    /// Open terminal connections by registration number. A short std Mutex: taken once when a
    /// connection opens, once when it closes, by a reload and by a scrape; never across an await.
    /// Its size is bounded by `max_connections`.
    live: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
}

/// What a successful reload found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Entries in the CRL now in force (0 without a CRL).
    pub revoked_certificates: usize,
    /// Open connections signalled to close because their certificate is now revoked.
    pub connections_closed: usize,
}

/// Removes its connection from the registry when dropped (the connection task ended).
pub struct Registration {
    trust: Arc<Trust>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut live) = self.trust.live.lock() {
            live.remove(&self.id);
        }
    }
}

fn lock_poisoned() -> KeysError {
    KeysError::PeerIdentity("trust state lock poisoned".into())
}

impl Trust {
    /// Reads the CA, server certificate and CRL named by `config` and builds the configs.
    pub fn load(config: &Config) -> Result<Arc<Trust>, KeysError> {
        let current = Self::build(&config.keys_dir, config.crl.as_deref(), config.admin_tls)?;
        Ok(Arc::new(Trust {
            keys_dir: config.keys_dir.clone(),
            crl: config.crl.clone(),
            admin_tls: config.admin_tls,
            current: RwLock::new(Arc::new(current)),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }))
    }

    fn build(
        keys_dir: &std::path::Path,
        crl: Option<&std::path::Path>,
        admin_tls: bool,
    ) -> Result<Current, KeysError> {
        let crl = crl.map(|path| tls::load_crl(keys_dir, path)).transpose()?;
        let terminal = tls::server_config_with(keys_dir, crl.as_ref(), Some(tls::ALPN))?;
        let admin = if admin_tls {
            Some(tls::server_config_with(keys_dir, crl.as_ref(), None)?)
        } else {
            None
        };
        let first = |file: &str| -> Result<CertificateFacts, KeysError> {
            let certs = tls::load_certs(&keys_dir.join(file))?;
            tls::certificate_facts(&certs[0])
        };
        Ok(Current {
            terminal,
            admin,
            revoked: Arc::new(crl.map(|c| c.revoked).unwrap_or_default()),
            server: first(keys::SERVER_CERT)?,
            ca: first(keys::CA_CERT)?,
        })
    }

    fn current(&self) -> Option<Arc<Current>> {
        self.current.read().ok().map(|c| c.clone())
    }

    /// The config for the next terminal handshake.
    pub fn terminal_config(&self) -> Option<Arc<ServerConfig>> {
        self.current().map(|c| c.terminal.clone())
    }

    /// The config for the next admin handshake (None when the admin listener is plain HTTP).
    pub fn admin_config(&self) -> Option<Arc<ServerConfig>> {
        self.current().and_then(|c| c.admin.clone())
    }

    /// Records an open terminal connection. When its certificate is already revoked (the
    /// handshake used the config from before a reload that finished meanwhile) `close` is
    /// cancelled at once.
    pub fn register(
        self: &Arc<Self>,
        terminal: &str,
        certificate: CertificateFacts,
        close: CancellationToken,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Lock order `live`, then `current` (as in reload): either the reload sees this entry,
        // or this check sees the reload's CRL. Without it a connection registering while a
        // reload ran could miss both.
        if let Ok(mut live) = self.live.lock() {
            let revoked =
                self.current().is_some_and(|c| c.revoked.contains(&certificate.serial_hex));
            if revoked {
                METRICS.revoked_connection_closed();
                close.cancel();
            }
            live.insert(id, Live { terminal: terminal.to_owned(), certificate, close });
        }
        Registration { trust: self.clone(), id }
    }

    /// Re-reads the CRL, CA and server certificate and swaps in new configs for new handshakes;
    /// then signals every open connection whose certificate the new CRL revokes to close. On
    /// error nothing changed.
    pub fn reload(&self) -> Result<ReloadOutcome, KeysError> {
        let built = Self::build(&self.keys_dir, self.crl.as_deref(), self.admin_tls);
        let next = match built {
            Ok(next) => Arc::new(next),
            Err(e) => {
                METRICS.trust_reload(false);
                return Err(e);
            }
        };
        let revoked = next.revoked.clone();
        let live = self.live.lock().map_err(|_| lock_poisoned())?;
        *self.current.write().map_err(|_| lock_poisoned())? = next;
        METRICS.trust_reload(true);
        let mut closed = 0;
        for connection in live.values() {
            if revoked.contains(&connection.certificate.serial_hex)
                && !connection.close.is_cancelled()
            {
                tracing::warn!(
                    terminal = %connection.terminal,
                    serial = %connection.certificate.serial_hex,
                    "certificate revoked: closing the connection after its in-flight requests"
                );
                connection.close.cancel();
                METRICS.revoked_connection_closed();
                closed += 1;
            }
        }
        Ok(ReloadOutcome { revoked_certificates: revoked.len(), connections_closed: closed })
    }

    /// Gauges for `/metrics`: certificate expiry (server, CA, and the connected terminals that
    /// expire soonest, at most [`MAX_TERMINAL_EXPIRY_SERIES`]) and the CRL size.
    pub fn gauges(&self) -> Vec<crate::metrics::Gauge> {
        use crate::metrics::Gauge;
        const EXPIRY: &str = "citycard_certificate_expiry_timestamp_seconds";
        const EXPIRY_HELP: &str =
            "End of validity (Unix seconds) of the server, CA and connected terminal certificates";
        let Some(current) = self.current() else { return Vec::new() };
        let mut out = vec![
            Gauge::new(EXPIRY, EXPIRY_HELP, "kind=\"server\"", current.server.not_after_unix_secs),
            Gauge::new(EXPIRY, EXPIRY_HELP, "kind=\"ca\"", current.ca.not_after_unix_secs),
        ];
        let mut terminals: HashMap<String, i64> = HashMap::new();
        if let Ok(live) = self.live.lock() {
            for connection in live.values() {
                let slot = terminals.entry(connection.terminal.clone()).or_insert(i64::MAX);
                *slot = (*slot).min(connection.certificate.not_after_unix_secs);
            }
        }
        let mut terminals: Vec<(String, i64)> = terminals.into_iter().collect();
        terminals.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        let omitted = terminals.len().saturating_sub(MAX_TERMINAL_EXPIRY_SERIES);
        for (terminal, not_after) in terminals.into_iter().take(MAX_TERMINAL_EXPIRY_SERIES) {
            // Terminal ids are [A-Za-z0-9._-] (TerminalId), so they need no label escaping.
            out.push(Gauge::new(
                EXPIRY,
                EXPIRY_HELP,
                &format!("kind=\"terminal\",terminal=\"{terminal}\""),
                not_after,
            ));
        }
        out.push(Gauge::new(
            "citycard_certificate_expiry_terminals_omitted",
            "Connected terminals left out of the expiry series by the series limit",
            "",
            omitted as i64,
        ));
        out.push(Gauge::new(
            "citycard_crl_revoked_certificates",
            "Entries in the certificate revocation list in force",
            "",
            current.revoked.len() as i64,
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Role, TerminalId};

    fn facts(keys_dir: &std::path::Path, terminal: &str) -> CertificateFacts {
        let certs = tls::load_certs(&keys_dir.join(format!("terminals/{terminal}.pem")));
        let certs = certs.unwrap_or_default();
        assert!(!certs.is_empty(), "no certificate for {terminal}");
        tls::certificate_facts(&certs[0]).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn reload_closes_revoked_registrations_and_a_bad_crl_keeps_the_old_one() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = tmp.path();
        keys::init(dir).unwrap_or_else(|e| panic!("{e}"));
        let old = TerminalId::new("old-1").unwrap_or_else(|e| panic!("{e}"));
        keys::issue_terminal(dir, &old, Role::Reader).unwrap_or_else(|e| panic!("{e}"));
        let crl = keys::revoke(dir, &old).unwrap_or_else(|e| panic!("{e}"));
        let config =
            Config { keys_dir: dir.to_path_buf(), crl: Some(crl.clone()), ..Config::default() };
        let trust = Trust::load(&config).unwrap_or_else(|e| panic!("{e}"));

        // Registering an already revoked certificate closes it at once.
        let old_close = CancellationToken::new();
        let _old = trust.register("old-1", facts(dir, "old-1"), old_close.clone());
        assert!(old_close.is_cancelled());

        let reader_close = CancellationToken::new();
        let kiosk_close = CancellationToken::new();
        let reader = trust.register("reader-1", facts(dir, "reader-1"), reader_close.clone());
        let _kiosk = trust.register("kiosk-1", facts(dir, "kiosk-1"), kiosk_close.clone());
        let id = TerminalId::new("reader-1").unwrap_or_else(|e| panic!("{e}"));
        keys::revoke(dir, &id).unwrap_or_else(|e| panic!("{e}"));
        let outcome = trust.reload().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcome, ReloadOutcome { revoked_certificates: 2, connections_closed: 1 });
        assert!(reader_close.is_cancelled());
        assert!(!kiosk_close.is_cancelled());
        drop(reader);

        std::fs::write(&crl, b"not a crl").unwrap_or_else(|e| panic!("{e}"));
        assert!(trust.reload().is_err());
        let gauges = trust.gauges();
        let revoked = gauges.iter().find(|g| g.name == "citycard_crl_revoked_certificates");
        assert_eq!(revoked.map(|g| g.value), Some(2), "old CRL stays in force");
        let terminals: Vec<&str> = gauges
            .iter()
            .filter(|g| g.labels.contains("kind=\"terminal\""))
            .map(|g| g.labels.as_str())
            .collect();
        // reader-1's registration was dropped; old-1 and kiosk-1 are still registered.
        assert_eq!(terminals.len(), 2, "{terminals:?}");
        assert!(terminals.iter().all(|l| !l.contains("reader-1")), "{terminals:?}");
    }
}
