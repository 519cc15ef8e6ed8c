//! The TLS listener, connection limits, shard workers and the shutdown sequence.
//!
//! A connection is two parts: [`session`], the protocol state machine without IO (tested on
//! simulated time), and [`connection`], the tokio driver that gives it the socket, the shard
//! queues and the clock. Answers are built by `citycard_protocol::answer`.

pub mod connection;
pub mod prealloc;
pub mod session;
pub mod trust;
pub mod worker;
pub mod write_behind;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use citycard_protocol::{CardId, KeyVersion, Request, Response};
use crossbeam::channel::Sender;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::engine::{Secrets, Shard, ShardOptions};
use crate::identity::Role;
use crate::journal::JournalOptions;
use crate::keys;
use crate::metrics::METRICS;
use worker::{Job, WorkerContext, WorkerShared};

/// What every connection task shares.
pub struct Shared {
    pub config: Config,
    pub shards: Vec<Sender<Job>>,
    pub workers: Vec<Arc<WorkerShared>>,
    /// Cancelled on SIGTERM/SIGINT or [`RunningServer::shutdown`].
    pub shutdown: CancellationToken,
    /// Cancelled when a shard's storage failed.
    pub failed: CancellationToken,
    /// Cancelled once `shutdown` or `failed` is: the parent of every connection's close token,
    /// so that an open connection waits on one token of its own instead of polling the two
    /// server-wide ones (each poll of those locks a mutex every runtime thread shares).
    pub stop_signal: CancellationToken,
    pub connections: AtomicU64,
    /// TLS configs for new handshakes and the registry of open connections (CRL reload).
    pub trust: Arc<trust::Trust>,
    /// Replication to PostgreSQL, when `[replicate]` is configured (metrics, `/readyz`).
    pub replication: Option<Arc<crate::replicate::Replication>>,
}

/// A started server. Dropping it does not stop it; call [`RunningServer::stop`].
pub struct RunningServer {
    pub local_addr: SocketAddr,
    shared: Arc<Shared>,
    stopping: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<()>>,
    accept_task: tokio::task::JoinHandle<()>,
    tracker: TaskTracker,
    _lock: File,
}

pub use crate::layout::{archive_dir, archive_root, lock_data_dir, shard_count, shard_dir};

/// Loads the issuer and assertion keys the engine needs.
pub fn load_secrets(keys_dir: &Path, cutoffs: &[(u16, u64)]) -> anyhow::Result<Secrets> {
    let issuer = keys::IssuerKeys::load(&keys_dir.join(keys::ISSUER_KEYS))?;
    let mut masters = BTreeMap::new();
    for version in issuer.versions() {
        if let Some(key) = issuer.key(version) {
            masters.insert(version, *key);
        }
    }
    let assertion = keys::load_assertion_key(&keys_dir.join(keys::ASSERTION_KEY))?;
    Ok(Secrets {
        issuer: masters,
        current_version: KeyVersion(issuer.current_version()),
        retire_after_ms: cutoffs.iter().copied().collect(),
        assertion,
    })
}

impl RunningServer {
    /// Opens every shard (recovering journals), binds the listener, and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
        config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let trust = trust::Trust::load(&config)?;
        Self::start_with_trust(config, trust).await
    }

    /// [`RunningServer::start`] with TLS material already loaded (the binary shares it with the
    /// admin listener, which starts first).
    pub async fn start_with_trust(
        config: Config,
        trust: Arc<trust::Trust>,
    ) -> anyhow::Result<RunningServer> {
        config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let lock = lock_data_dir(&config.data_dir)?;
        let count = shard_count(&config.data_dir, config.shards)?;
        let archive = archive_root(&config.data_dir, config.archive_dir.as_deref())?;
        let secrets = Arc::new(load_secrets(&config.keys_dir, &config.key_cutoffs)?);

        let mut opened = Vec::new();
        for index in 0..count {
            let options = ShardOptions {
                index,
                count,
                dir: shard_dir(&config.data_dir, index),
                journal: JournalOptions {
                    segment_bytes: config.segment_bytes,
                    faults: config.journal_faults.clone(),
                    storage: crate::journal::Storage::real(),
                    background: Some(prealloc::threads()),
                },
                limits: config.limits,
                checkpoint: config.checkpoint,
                archive: Some(archive_dir(&config.data_dir, archive.as_deref(), index)),
            };
            let secrets = secrets.clone();
            opened.push(std::thread::spawn(move || Shard::open(options, secrets)));
        }
        let mut shards = Vec::new();
        let mut last_seqs = Vec::new();
        for (index, handle) in opened.into_iter().enumerate() {
            let (shard, report) = handle
                .join()
                .map_err(|_| anyhow::anyhow!("shard {index} panicked while opening"))?
                .with_context(|| format!("opening shard {index}"))?;
            tracing::info!(
                shard = index,
                cards = report.cards,
                replayed = report.replayed,
                last_seq = report.last_seq,
                rebuilt_state = report.rebuilt_state,
                from_checkpoint = report.from_checkpoint,
                rebuild_reason = report.rebuild.as_ref().map_or("none", |r| r.label()),
                rebuild_detail = %report.rebuild.as_ref().map(ToString::to_string).unwrap_or_default(),
                "shard recovered"
            );
            last_seqs.push(report.last_seq);
            shards.push(shard);
        }

        let shutdown = CancellationToken::new();
        let failed = CancellationToken::new();
        let (replication, mut links) = match &config.replicate {
            Some(replicate) => {
                let setups = (0..count)
                    .map(|index| crate::replicate::primary::ShardSetup {
                        index,
                        journal: shard_dir(&config.data_dir, index).join("journal"),
                        archive: archive_dir(&config.data_dir, archive.as_deref(), index),
                        last_seq: last_seqs[usize::from(index)],
                    })
                    .collect();
                let (replication, links) = crate::replicate::primary::start(
                    replicate,
                    &config.data_dir,
                    count,
                    setups,
                    failed.clone(),
                )?;
                (Some(replication), links.into_iter().map(Some).collect())
            }
            None => {
                crate::replicate::site::refuse_unreplicated_standby(&config.data_dir)?;
                (None, Vec::new())
            }
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let mut senders = Vec::new();
        let mut worker_shared = Vec::new();
        let mut workers = Vec::new();
        for shard in shards {
            let (tx, rx) = crossbeam::channel::bounded(config.queue_depth);
            let shared = Arc::new(WorkerShared {
                hotlist_version: AtomicU64::new(shard.hotlist_version()),
                last_batch: AtomicU64::new(0),
                numbered_uploads: Default::default(),
            });
            let index = usize::from(shard.index());
            let ctx = WorkerContext {
                shard,
                queue: rx,
                shared: shared.clone(),
                max_batch: config.max_batch,
                stopping: stopping.clone(),
                failed: failed.clone(),
                pin_core: if config.pin_cores && !cores.is_empty() {
                    Some(cores[index % cores.len()])
                } else {
                    None
                },
                replication: links.get_mut(index).and_then(Option::take),
            };
            workers.push(
                std::thread::Builder::new()
                    .name(format!("shard-{index}"))
                    .spawn(move || worker::run(ctx))
                    .context("spawning a shard thread")?,
            );
            senders.push(tx);
            worker_shared.push(shared);
        }

        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let local_addr = listener.local_addr()?;
        let stop_signal = CancellationToken::new();
        tokio::spawn(relay_stop(shutdown.clone(), failed.clone(), stop_signal.clone()));
        let shared = Arc::new(Shared {
            config,
            shards: senders,
            workers: worker_shared,
            shutdown: shutdown.clone(),
            failed,
            stop_signal,
            connections: AtomicU64::new(0),
            trust,
            replication,
        });
        let tracker = TaskTracker::new();
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), tracker.clone()));
        Ok(RunningServer {
            local_addr,
            shared,
            stopping,
            workers,
            accept_task,
            tracker,
            _lock: lock,
        })
    }

    /// Reloads the issuer and assertion keys from the keys directory (after
    /// `citycard keys rotate-issuer`): cards issued or replaced from now on use the newest
    /// version. Each shard applies it between two of its jobs, so no request sees half a change.
    pub fn reload_keys(&self) -> anyhow::Result<u16> {
        let config = &self.shared.config;
        let secrets = Arc::new(load_secrets(&config.keys_dir, &config.key_cutoffs)?);
        let version = secrets.current_version.0;
        let (reply, _) = tokio::sync::mpsc::unbounded_channel();
        for (index, shard) in self.shared.shards.iter().enumerate() {
            let job = Job {
                terminal: Arc::from("reload"),
                request_id: citycard_protocol::RequestId(0),
                work: worker::Work::Reload(secrets.clone()),
                reply: reply.clone(),
            };
            // A control message waits for queue space (bounded) instead of being refused Busy.
            shard
                .send_timeout(job, RELOAD_QUEUE_WAIT)
                .map_err(|_| anyhow::anyhow!("shard {index} did not take the key reload"))?;
        }
        Ok(version)
    }

    /// Re-reads the CRL (and CA and server certificate) for new handshakes and closes, after
    /// their in-flight requests, the open connections whose certificate is now revoked. On
    /// error (a bad CRL, say) the old trust stays in force.
    pub fn reload_trust(&self) -> anyhow::Result<trust::ReloadOutcome> {
        Ok(self.shared.trust.reload()?)
    }

    /// The state the admin listener reads (queues, connections, hotlist versions).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Resolves when a shard's storage failed (the process must then exit without draining).
    pub async fn failed(&self) {
        self.shared.failed.cancelled().await
    }

    pub fn has_failed(&self) -> bool {
        self.shared.failed.is_cancelled()
    }

    /// Stops accepting, lets connections finish what is in flight (bounded by the drain
    /// timeout), then stops the shards after their last commit.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shared.shutdown.cancel();
        self.accept_task.abort();
        let _ = self.accept_task.await;
        self.tracker.close();
        let drain = Duration::from_millis(self.shared.config.drain_timeout_ms + 2_000);
        if tokio::time::timeout(drain, self.tracker.wait()).await.is_err() {
            tracing::warn!("connections still open after the drain timeout; closing them");
        }
        self.stopping.store(true, Ordering::Release);
        let failed = self.shared.failed.is_cancelled();
        drop(self.shared);
        let mut panicked = false;
        for handle in self.workers {
            let joined = tokio::task::spawn_blocking(move || handle.join()).await;
            panicked |= !matches!(joined, Ok(Ok(())));
        }
        if failed || panicked {
            bail!("a shard's storage failed; see the log");
        }
        Ok(())
    }
}

/// Cancels `signal` when `shutdown` or `failed` is cancelled (the task ends then).
async fn relay_stop(
    shutdown: CancellationToken,
    failed: CancellationToken,
    signal: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = failed.cancelled() => {}
    }
    signal.cancel();
}

/// How long a key reload waits for room in a full shard queue (a full queue drains in well under
/// a second; longer means the shard is stuck, and the reload is reported as failed).
const RELOAD_QUEUE_WAIT: Duration = Duration::from_secs(5);

/// TLS handshakes in progress at once: bounds the CPU a handshake flood can take, and keeps
/// clients that connect and never speak TLS from holding terminal connection slots (they hold a
/// handshake slot until the handshake timeout instead).
const MAX_HANDSHAKES: usize = 256;

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tracker: TaskTracker) {
    let slots = Arc::new(Semaphore::new(shared.config.max_connections));
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(handshake_slot) = handshakes.clone().try_acquire_owned() else {
            METRICS.handshake_failure("other");
            tracing::warn!(%peer, "too many handshakes in progress; dropping the connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // Read per accept, so a SIGHUP reload applies to the next handshake.
        let Some(config) = shared.trust.terminal_config() else {
            tracing::error!(
                "TLS configuration unavailable (lock poisoned); dropping the connection"
            );
            continue;
        };
        let acceptor = TlsAcceptor::from(config);
        let shared = shared.clone();
        let slots = slots.clone();
        tracker.spawn(async move {
            let stream = match handshake(tcp, &acceptor, &shared).await {
                Ok(stream) => stream,
                Err(reason) => {
                    tracing::info!(%peer, reason, "connection refused");
                    return;
                }
            };
            drop(handshake_slot);
            match slots.try_acquire_owned() {
                Ok(permit) => {
                    serve_connection(stream, peer, shared).await;
                    drop(permit);
                }
                Err(_) => {
                    tracing::warn!(%peer, "connection limit reached; refusing");
                    refuse_connection(stream).await;
                }
            }
        });
    }
}

async fn handshake(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    shared: &Shared,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
    let timeout = Duration::from_millis(shared.config.handshake_timeout_ms);
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let (_, conn) = stream.get_ref();
            if conn.alpn_protocol() != Some(crate::tls::ALPN) {
                METRICS.handshake_failure("no_alpn");
                return Err("client did not offer ALPN citycard/1".into());
            }
            Ok(stream)
        }
        Ok(Err(e)) => {
            METRICS.handshake_failure(handshake_reason(&e));
            Err(format!("handshake failed: {e}"))
        }
        Err(_) => {
            METRICS.handshake_failure("timeout");
            Err("handshake timed out".into())
        }
    }
}

async fn refuse_connection(mut stream: tokio_rustls::server::TlsStream<TcpStream>) {
    use tokio::io::AsyncWriteExt;
    let mut buf = bytes::BytesMut::new();
    let _ = Response::error(
        citycard_protocol::ErrorCode::TooManyConnections,
        "server at its connection limit",
    )
    .encode(citycard_protocol::RequestId(0), &mut buf);
    // Bounded: a client that does not read its refusal is dropped anyway.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&buf).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn serve_connection(
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) {
    let identity = crate::tls::peer_identity(stream.get_ref().1);
    let (terminal, role) = match identity {
        Ok(identity) => identity,
        Err(e) => {
            METRICS.handshake_failure("no_identity");
            tracing::warn!(%peer, error = %e, "client certificate lacks a terminal identity");
            return;
        }
    };
    if !role.is_terminal() {
        METRICS.handshake_failure("wrong_role");
        tracing::warn!(%peer, terminal = %terminal, %role, "certificate role may not open a terminal connection");
        return;
    }
    let certificate = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(leaf) => crate::tls::certificate_facts(leaf),
        None => Err(crate::keys::KeysError::PeerIdentity("no client certificate".into())),
    };
    let certificate = match certificate {
        Ok(facts) => facts,
        Err(e) => {
            METRICS.handshake_failure("no_identity");
            tracing::warn!(%peer, error = %e, "client certificate unreadable");
            return;
        }
    };
    let close = shared.stop_signal.child_token();
    let _registration = shared.trust.register(terminal.as_str(), certificate, close.clone());
    let span = tracing::info_span!("connection", terminal = %terminal, role = %role, %peer);
    let _entered = span.clone();
    shared.connections.fetch_add(1, Ordering::Relaxed);
    METRICS.connection_opened();
    let terminal: Arc<str> = Arc::from(terminal.as_str());
    let end = {
        use tracing::Instrument;
        tracing::info!(parent: &span, "terminal connected");
        connection::Connection::new(stream, terminal, role, shared.clone())
            .closed_by(close)
            .run()
            .instrument(span.clone())
            .await
    };
    shared.connections.fetch_sub(1, Ordering::Relaxed);
    tracing::info!(parent: &span, end = ?end, "terminal disconnected");
}

/// Sorts a failed handshake into the reasons `/metrics` counts.
fn handshake_reason(error: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = error.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return "other";
    };
    match tls {
        Error::NoCertificatesPresented => "no_certificate",
        Error::NoApplicationProtocol => "no_alpn",
        Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "unknown_ca",
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        Error::InvalidCertificate(CertificateError::Revoked) => "revoked",
        Error::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
        ) => "wrong_purpose",
        _ => "other",
    }
}

/// Which operations each role may call (DESIGN.md "Terminal roles").
pub fn permitted(role: Role, request: &Request) -> bool {
    use Request::*;
    matches!(
        (role, request),
        (_, Hello { .. })
            | (
                Role::Reader,
                Purchase { .. }
                    | Balance { .. }
                    | OfflineBatch { .. }
                    | NumberedOfflineBatch { .. }
                    | HotlistSync { .. }
                    | TapIn { .. }
                    | TapOut { .. }
                    | Reversal { .. }
                    | Inquiry { .. }
                    | Funds { .. }
                    | FundsProduct { .. }
            )
            | (
                Role::Kiosk,
                Balance { .. }
                    | History { .. }
                    | TopUp { .. }
                    | Identity { .. }
                    | Inquiry { .. }
                    | Funds { .. }
                    | FundsProduct { .. }
            )
            | (
                Role::Counter,
                Issue { .. }
                    | IssueProduct { .. }
                    | SetProduct { .. }
                    | Block { .. }
                    | Unblock { .. }
                    | Replace { .. }
                    | Close { .. }
                    | TopUp { .. }
                    | History { .. }
                    | Identity { .. }
                    | Inquiry { .. },
            )
    )
}

/// FNV-1a: a hash that never changes between builds or runs (issue routing must be stable so a
/// retried issue reaches the shard that holds its op_ref).
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The shard a single-shard request goes to.
pub fn route(request: &Request, terminal: &str, shard_count: usize) -> usize {
    let n = shard_count as u16;
    let card = match request {
        Request::Issue { op_ref, .. } | Request::IssueProduct { op_ref, .. } => {
            return (stable_hash(&[terminal.as_bytes(), &op_ref.to_be_bytes()]) % shard_count as u64)
                as usize
        }
        Request::Block { card_id, .. }
        | Request::Unblock { card_id, .. }
        | Request::Replace { card_id, .. }
        | Request::Close { card_id, .. }
        | Request::SetProduct { card_id, .. } => *card_id,
        other => other.card_auth().map_or(CardId(0), |a| a.card_id),
    };
    usize::from(crate::engine::shard_of(card, n))
}
