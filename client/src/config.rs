//! Client configuration: the server, the terminal's TLS identity, and every limit the client
//! puts on itself (in flight, timeouts, retries), each with its reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::ClientError;

/// The single ALPN protocol citycard speaks (PROTOCOL.md section 1).
pub const ALPN: &[u8] = b"citycard/1";
/// The server's requests-in-flight limit per connection (ServerInfo `max_in_flight`): more would
/// only wait in TCP buffers, so it is also the client's ceiling.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most attempts per request: with the default backoff eight attempts span about 6 s, long
/// enough for a server restart on a small machine, short enough for a person waiting at a
/// terminal. A caller wanting longer repeats the call (same bytes, same answer).
pub const MAX_ATTEMPTS: u32 = 8;
/// Longest backoff between two attempts, whatever the configuration says.
pub const MAX_BACKOFF_MS: u64 = 30_000;
/// The TLS identity's name limit (certificate CN, PROTOCOL.md section 1).
pub const MAX_TERMINAL_ID_LEN: usize = citycard_protocol::crypto::MAX_TERMINAL_ID_LEN;

/// How a request is retried after Busy, Unavailable or a lost connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, 1..=[`MAX_ATTEMPTS`] (1 = no retry).
    pub attempts: u32,
    /// Wait before the second attempt; doubled for every further one.
    pub initial_backoff_ms: u64,
    /// Ceiling of the doubling, at most [`MAX_BACKOFF_MS`].
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // 50, 100, 200, ... 2000 ms: Busy clears within milliseconds; a restart takes seconds.
        RetryPolicy { attempts: MAX_ATTEMPTS, initial_backoff_ms: 50, max_backoff_ms: 2_000 }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt` (0-based; attempt 0 has none), without jitter.
    pub fn backoff_ms(&self, attempt: u32) -> u64 {
        if attempt == 0 {
            return 0;
        }
        let doubled = self.initial_backoff_ms.saturating_mul(1u64 << (attempt - 1).min(20));
        doubled.min(self.max_backoff_ms).min(MAX_BACKOFF_MS)
    }
}

/// Everything a [`crate::Client`] needs. Build it with [`Config::from_keys_dir`] or
/// [`Config::new`], then adjust the public fields.
#[derive(Clone)]
pub struct Config {
    /// `host:port` of the server.
    pub server: String,
    /// The name the server certificate must be valid for (the development certificate is
    /// issued for `localhost` and 127.0.0.1).
    pub server_name: String,
    /// The terminal id: the CN of the client certificate. Cards compute their cryptograms over
    /// it, so it must match the certificate exactly.
    pub terminal_id: String,
    /// rustls configuration: ring provider, TLS 1.3 only, ALPN `citycard/1`, client certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// Requests outstanding at once, 1..=[`MAX_IN_FLIGHT`]; callers beyond it wait their turn.
    pub max_in_flight: usize,
    /// TCP connect plus TLS handshake; the server itself gives up on a handshake after 5 s.
    pub connect_timeout_ms: u64,
    /// Wait for one answer. The server answers in milliseconds or sheds load with Busy; ten
    /// seconds without an answer means the connection is broken, so it is replaced.
    pub request_timeout_ms: u64,
    /// Retries of Busy, Unavailable and connection loss.
    pub retry: RetryPolicy,
    /// **For benchmarking only.** When set, answers are not checked against their request
    /// (card id, ATC) nor their MACs verified, even where a key is passed: the answer is
    /// returned as the server sent it. It exists for the load tester's floor mode, whose echo
    /// server answers with zero fields and no MAC. Never set it in a terminal: an unchecked
    /// answer may be forged.
    pub unchecked_answers_for_benchmarking: bool,
    /// Keep the connection when an answer does not come within `request_timeout_ms` (the
    /// default replaces it, taking the silence for a broken connection). A load tester that
    /// counts timeouts sets it, with `retry.attempts = 1`, so a slow server is not also given
    /// a new handshake per timeout; an answer that comes later is counted by
    /// [`crate::Client::late_answers`].
    pub keep_connection_on_timeout: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("server", &self.server)
            .field("server_name", &self.server_name)
            .field("terminal_id", &self.terminal_id)
            .field("max_in_flight", &self.max_in_flight)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("retry", &self.retry)
            .field("unchecked_answers_for_benchmarking", &self.unchecked_answers_for_benchmarking)
            .field("keep_connection_on_timeout", &self.keep_connection_on_timeout)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// A configuration from PEM files: the CA that issued the server certificate, the
    /// terminal's certificate chain and its private key. `terminal_id` must be the
    /// certificate's CN.
    pub fn new(
        server: impl Into<String>,
        terminal_id: impl Into<String>,
        ca_pem: &Path,
        cert_pem: &Path,
        key_pem: &Path,
    ) -> Result<Config, ClientError> {
        let terminal_id = terminal_id.into();
        if terminal_id.is_empty() || terminal_id.len() > MAX_TERMINAL_ID_LEN {
            return Err(ClientError::Config(format!(
                "terminal id must be 1..={MAX_TERMINAL_ID_LEN} bytes"
            )));
        }
        Ok(Config {
            server: server.into(),
            server_name: "localhost".to_owned(),
            terminal_id,
            tls: tls_config(ca_pem, cert_pem, key_pem)?,
            max_in_flight: MAX_IN_FLIGHT,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            retry: RetryPolicy::default(),
            unchecked_answers_for_benchmarking: false,
            keep_connection_on_timeout: false,
        })
    }

    /// A configuration from a citycard keys directory laid out by `citycard keys init`:
    /// `ca.pem` and `terminals/<terminal>.pem`/`.key`.
    pub fn from_keys_dir(
        server: impl Into<String>,
        keys_dir: &Path,
        terminal: &str,
    ) -> Result<Config, ClientError> {
        if terminal.contains(['/', '\\']) || terminal.starts_with('.') {
            return Err(ClientError::Config(format!("bad terminal name {terminal:?}")));
        }
        let terminals = keys_dir.join("terminals");
        Config::new(
            server,
            terminal,
            &keys_dir.join("ca.pem"),
            &terminals.join(format!("{terminal}.pem")),
            &terminals.join(format!("{terminal}.key")),
        )
    }

    /// Checks the limits; [`crate::Client::new`] calls it.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |what: String| Err(ClientError::Config(what));
        if !(1..=MAX_IN_FLIGHT).contains(&self.max_in_flight) {
            return bad(format!("max_in_flight must be 1..={MAX_IN_FLIGHT}"));
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.retry.attempts) {
            return bad(format!("retry.attempts must be 1..={MAX_ATTEMPTS}"));
        }
        if self.connect_timeout_ms == 0 || self.request_timeout_ms == 0 {
            return bad("timeouts must be above 0 ms".into());
        }
        if self.retry.max_backoff_ms > MAX_BACKOFF_MS {
            return bad(format!("retry.max_backoff_ms must be at most {MAX_BACKOFF_MS}"));
        }
        rustls_pki_types::ServerName::try_from(self.server_name.as_str())
            .map_err(|e| ClientError::Config(format!("server_name: {e}")))?;
        Ok(())
    }
}

fn key_file_error(path: &Path, reason: impl std::fmt::Display) -> ClientError {
    ClientError::KeyFile { path: PathBuf::from(path), reason: reason.to_string() }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| key_file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| key_file_error(path, e))?;
    if certs.is_empty() {
        return Err(key_file_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// rustls client configuration as PROTOCOL.md section 1 requires: the ring provider (the only
/// one compiled in), TLS 1.3 only, ALPN `citycard/1`, no resumption (the server offers none),
/// no early data (0-RTT is not accepted), the terminal certificate for mutual TLS.
pub fn tls_config(
    ca_pem: &Path,
    cert_pem: &Path,
    key_pem: &Path,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_pem)? {
        roots.add(cert)?;
    }
    let chain = certs(cert_pem)?;
    let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| key_file_error(key_pem, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_ceiling() {
        let policy = RetryPolicy { attempts: 8, initial_backoff_ms: 50, max_backoff_ms: 300 };
        let waits: Vec<u64> = (0..6).map(|a| policy.backoff_ms(a)).collect();
        assert_eq!(waits, [0, 50, 100, 200, 300, 300]);
        let huge = RetryPolicy { attempts: 8, initial_backoff_ms: u64::MAX, max_backoff_ms: 10 };
        assert_eq!(huge.backoff_ms(7), 10);
    }

    #[test]
    fn missing_key_files_name_the_path() {
        let err = Config::from_keys_dir("127.0.0.1:1", Path::new("/nonexistent"), "reader-1")
            .expect_err("no such files");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let err = Config::from_keys_dir("127.0.0.1:1", Path::new("/tmp"), "../x").expect_err("bad");
        assert!(matches!(err, ClientError::Config(_)), "{err}");
    }
}
