//! The admin listener: plain HTTP on loopback with `/metrics` (Prometheus), `/healthz` and
//! `/readyz`. It starts before recovery so operators can see "starting", and says "draining"
//! during shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::metrics::METRICS;
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
#[derive(Default)]
pub struct Health {
    state: AtomicU8,
    server: OnceLock<Arc<Shared>>,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
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

    /// Lets `/metrics` read queue depths and connection counts of the running server.
    pub fn attach(&self, shared: Arc<Shared>) {
        let _ = self.server.set(shared);
    }
}

/// Most bytes of an admin request we read: a GET line and a few headers.
const MAX_REQUEST: usize = 4096;
/// A scrape that does not send its request within this is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent admin connections; more are closed at once (it is a loopback tool, not a service).
const MAX_ADMIN_CONNECTIONS: usize = 32;

/// Binds the admin address and serves until the process ends.
pub async fn spawn(addr: SocketAddr, health: Arc<Health>) -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).await.with_context(|| format!("binding admin listener {addr}"))?;
    let local = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
            let health = health.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, serve(&mut stream, &health)).await;
                drop(permit);
            });
        }
    });
    Ok(local)
}

async fn serve(stream: &mut tokio::net::TcpStream, health: &Health) -> std::io::Result<()> {
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
    let (status, content_type, body) = if method != "GET" {
        ("405 Method Not Allowed", "text/plain", "only GET\n".to_owned())
    } else {
        match path {
            "/metrics" => ("200 OK", "text/plain; version=0.0.4", render(health)),
            "/healthz" => match health.state() {
                State::Failed => ("503 Service Unavailable", "text/plain", "failed\n".into()),
                _ => ("200 OK", "text/plain", "ok\n".into()),
            },
            "/readyz" => match health.state() {
                State::Ready => ("200 OK", "text/plain", "ready\n".into()),
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
    let mut gauges =
        vec![("citycard_up", String::new(), u64::from(health.state() == State::Ready))];
    if let Some(shared) = health.server.get() {
        gauges.push((
            "citycard_connections",
            String::new(),
            shared.connections.load(Ordering::Relaxed),
        ));
        for (i, queue) in shared.shards.iter().enumerate() {
            gauges.push(("citycard_queue_depth", format!("shard=\"{i}\""), queue.len() as u64));
        }
        for (i, w) in shared.workers.iter().enumerate() {
            gauges.push((
                "citycard_last_batch_jobs",
                format!("shard=\"{i}\""),
                w.last_batch.load(Ordering::Relaxed),
            ));
        }
        for (i, w) in shared.workers.iter().enumerate() {
            gauges.push((
                "citycard_hotlist_version",
                format!("shard=\"{i}\""),
                w.hotlist_version.load(Ordering::Relaxed),
            ));
        }
    }
    METRICS.render(&gauges)
}
