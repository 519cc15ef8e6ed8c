//! Opening a PostgreSQL connection: TLS (rustls with ring, the CA from `replicate.ca`) whenever
//! a host is not loopback, plain TCP or a Unix socket on the machine itself.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, NoTls};

use super::{ReplicateConfig, ReplicateError};

/// How a connection string will be used.
pub struct Plan {
    pub pg: tokio_postgres::Config,
    /// The CA to verify PostgreSQL's certificate with; None: no TLS (loopback only).
    pub tls: Option<rustls::ClientConfig>,
    pub timeout: Duration,
}

fn is_loopback(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost" || IpAddr::from_str(name).is_ok_and(|ip| ip.is_loopback())
        }
    }
}

/// Parses the connection string and decides on TLS. Off loopback TLS is required and a CA must
/// be given: a connection that carries every card transaction is never sent in the clear.
pub fn plan(config: &ReplicateConfig) -> Result<Plan, ReplicateError> {
    plan_for(&config.conninfo, config.ca.as_deref(), config.connect_timeout_ms)
}

/// [`plan`] for a connection string of its own (the standby's `--source`).
pub fn plan_for(
    conninfo: &str,
    ca: Option<&std::path::Path>,
    timeout_ms: u64,
) -> Result<Plan, ReplicateError> {
    let mut pg = tokio_postgres::Config::from_str(conninfo)
        .map_err(|e| ReplicateError::Config(format!("replicate.conninfo does not parse: {e}")))?;
    let local = pg.get_hosts().iter().all(is_loopback)
        && pg.get_hostaddrs().iter().all(|ip| ip.is_loopback());
    if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
        return Err(ReplicateError::Config("replicate.conninfo names no host".into()));
    }
    if !local && pg.get_ssl_mode() == SslMode::Disable {
        return Err(ReplicateError::Config(
            "replicate.conninfo names a host that is not loopback with sslmode=disable; TLS is \
             required off this machine"
                .into(),
        ));
    }
    let tls =
        match (local, ca) {
            (false, None) => return Err(ReplicateError::Config(
                "replicate.conninfo names a host that is not loopback: set replicate.ca to the \
                 PEM file of the CA that signed PostgreSQL's server certificate (TLS is required)"
                    .into(),
            )),
            (_, Some(ca)) => {
                pg.ssl_mode(SslMode::Require);
                Some(client_config(ca)?)
            }
            (true, None) => {
                pg.ssl_mode(SslMode::Disable);
                None
            }
        };
    pg.application_name("citycard");
    let timeout = Duration::from_millis(timeout_ms);
    pg.connect_timeout(timeout);
    Ok(Plan { pg, tls, timeout })
}

fn client_config(ca: &std::path::Path) -> Result<rustls::ClientConfig, ReplicateError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| ReplicateError::Tls(format!("{}: {e}", ca.display())))?;
    for cert in certs {
        let cert = cert.map_err(|e| ReplicateError::Tls(format!("{}: {e}", ca.display())))?;
        roots.add(cert).map_err(|e| ReplicateError::Tls(format!("{}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(ReplicateError::Tls(format!("{} holds no certificate", ca.display())));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        // PostgreSQL 15 with OpenSSL 1.1.1 or later speaks TLS 1.3; nothing older is offered.
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ReplicateError::Tls(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// Connects (bounded by the plan's timeout) and drives the connection on its own task; the
/// connection ends when the client is dropped.
pub async fn connect(plan: &Plan) -> Result<Client, ReplicateError> {
    let attempt = async {
        match &plan.tls {
            None => {
                let (client, connection) = plan.pg.connect(NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "postgresql connection ended");
                    }
                });
                Ok::<_, ReplicateError>(client)
            }
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone());
                let (client, connection) = plan.pg.connect(tls).await?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "postgresql connection ended");
                    }
                });
                Ok(client)
            }
        }
    };
    match tokio::time::timeout(plan.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ReplicateError::ConnectTimeout(plan.timeout.as_millis() as u64)),
    }
}
