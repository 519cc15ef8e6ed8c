//! The admin listener: `/metrics` (Prometheus), `/healthz` and `/readyz` over plain HTTP on
//! loopback, or over mutual TLS for `monitor` certificates (config `admin_tls`). It starts before recovery so operators can see "starting", and says "draining"
//! during shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::identity::Role;
use crate::metrics::{Gauge, METRICS};
use crate::server::trust::Trust;
use crate::server::Shared;

/// Lifecycle as reported by `/readyz` and `/healthz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Starting = 0,
    Ready = 1,
    Draining = 2,
    Failed = 3,
}

/// Shared between the admin listener and whoever drives the server's lifecycle.
pub struct Health {
    state: AtomicU8,
    server: OnceLock<Arc<Shared>>,
    /// When the process started, Unix seconds (`citycard_start_time_seconds`).
    started_unix_secs: i64,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health {
            state: AtomicU8::new(State::Starting as u8),
            server: OnceLock::new(),
            started_unix_secs: (crate::now_ms() / 1000) as i64,
        })
    }

    pub fn set(&self, state: State) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            1 => State::Ready,
            2 => State::Draining,
            3 => State::Failed,
            _ => State::Starting,
        }
    }

    /// Why replication keeps the server from being ready (stalled, not connected, fenced).
    pub fn replication_not_ready(&self) -> Option<String> {
        self.server.get()?.replication.as_ref()?.not_ready()
    }

    /// Lets `/metrics` read queue depths and connection counts of the running server.
    pub fn attach(&self, shared: Arc<Shared>) {
        let _ = self.server.set(shared);
    }
}

/// Most bytes of an admin request we read: a GET line and a few headers.
const MAX_REQUEST: usize = 4096;
/// A scrape that does not finish its TLS handshake and send its request within this is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent admin connections; more are closed at once (a scraper or two, not a service).
const MAX_ADMIN_CONNECTIONS: usize = 32;

/// Binds the admin address and serves until the process ends. With `trust` carrying an admin
/// TLS config (config `admin_tls`), every connection must complete mutual TLS with a
/// certificate from the CA whose role is `monitor`; other roles get `403`. Without it the
/// listener is plain HTTP, which [`crate::config::Config::validate`] allows on loopback only.
pub async fn spawn(
    addr: SocketAddr,
    health: Arc<Health>,
    trust: Option<Arc<Trust>>,
) -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).await.with_context(|| format!("binding admin listener {addr}"))?;
    let local = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
            let health = health.clone();
            // Taken per connection, so a SIGHUP reload (new CRL) applies to the next scrape.
            let tls = trust.as_ref().map(|t| t.admin_config());
            tokio::spawn(async move {
                let served = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    match tls {
                        None => serve(stream, &health, Access::Allowed).await,
                        // A trust without an admin config: TLS was asked for but is not set
                        // up, so nothing is served in the clear.
                        Some(None) => Ok(()),
                        Some(Some(config)) => serve_tls(stream, peer, config, &health).await,
                    }
                })
                .await;
                if let Ok(Err(e)) = served {
                    tracing::debug!(%peer, error = %e, "admin request failed");
                }
                drop(permit);
            });
        }
    });
    Ok(local)
}

/// Whether the peer may read the admin endpoints.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Allowed,
    /// TLS peer with a valid certificate of another role: answered 403.
    Forbidden,
}

async fn serve_tls(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    health: &Health,
) -> std::io::Result<()> {
    let stream = match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::info!(%peer, error = %e, "admin TLS handshake refused");
            return Ok(());
        }
    };
    let access = match crate::tls::peer_identity(stream.get_ref().1) {
        Ok((_, Role::Monitor)) => Access::Allowed,
        Ok((id, role)) => {
            tracing::warn!(%peer, terminal = %id, %role, "admin listener refused a non-monitor certificate");
            Access::Forbidden
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "admin client certificate lacks an identity");
            Access::Forbidden
        }
    };
    serve(stream, health, access).await
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    health: &Health,
    access: Access,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = if access == Access::Forbidden {
        ("403 Forbidden", "text/plain", "a monitor certificate is required\n".to_owned())
    } else if method != "GET" {
        ("405 Method Not Allowed", "text/plain", "only GET\n".to_owned())
    } else {
        match path {
            "/metrics" => ("200 OK", "text/plain; version=0.0.4", render(health)),
            "/healthz" => match health.state() {
                State::Failed => ("503 Service Unavailable", "text/plain", "failed\n".into()),
                _ => ("200 OK", "text/plain", "ok\n".into()),
            },
            "/readyz" => match health.state() {
                State::Ready => match health.replication_not_ready() {
                    None => ("200 OK", "text/plain", "ready\n".into()),
                    Some(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
                },
                other => {
                    ("503 Service Unavailable", "text/plain", format!("{other:?}\n").to_lowercase())
                }
            },
            _ => ("404 Not Found", "text/plain", "not found\n".into()),
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn render(health: &Health) -> String {
    let state = health.state();
    let mut gauges = vec![Gauge::new(
        "citycard_up",
        "1 when the server is ready to serve terminals",
        "",
        i64::from(state == State::Ready && health.replication_not_ready().is_none()),
    )];
    for (name, s) in [
        ("starting", State::Starting),
        ("ready", State::Ready),
        ("draining", State::Draining),
        ("failed", State::Failed),
    ] {
        gauges.push(Gauge::new(
            "citycard_state",
            "Lifecycle state, one series per state; 1 marks the current one",
            &format!("state=\"{name}\""),
            i64::from(state == s),
        ));
    }
    gauges.push(Gauge::new(
        "citycard_start_time_seconds",
        "Unix time the process started (a change means a restart)",
        "",
        health.started_unix_secs,
    ));
    if let Some(shared) = health.server.get() {
        gauges.push(Gauge::new(
            "citycard_connections",
            "Open terminal connections",
            "",
            shared.connections.load(Ordering::Relaxed) as i64,
        ));
        for (i, queue) in shared.shards.iter().enumerate() {
            gauges.push(Gauge::new(
                "citycard_queue_depth",
                "Jobs waiting in a shard's queue",
                &format!("shard=\"{i}\""),
                queue.len() as i64,
            ));
        }
        for (i, w) in shared.workers.iter().enumerate() {
            gauges.push(Gauge::new(
                "citycard_last_batch_jobs",
                "Jobs in a shard's most recent group commit",
                &format!("shard=\"{i}\""),
                w.last_batch.load(Ordering::Relaxed) as i64,
            ));
        }
        for (i, w) in shared.workers.iter().enumerate() {
            gauges.push(Gauge::new(
                "citycard_hotlist_version",
                "A shard's hotlist version (card blocks and unblocks so far)",
                &format!("shard=\"{i}\""),
                w.hotlist_version.load(Ordering::Relaxed) as i64,
            ));
        }
        gauges.extend(shared.trust.gauges());
        if let Some(replication) = &shared.replication {
            gauges.extend(crate::replicate::link::gauges(replication));
        }
    }
    METRICS.render(&gauges)
}
