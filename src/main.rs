//! The `citycard` binary: argument parsing only; everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use citycard::admin::{self, Health, State};
use citycard::config::{Config, KeyCutoff, Settings};
use citycard::keys::{self, Role, TerminalId};
use citycard::server::trust::Trust;
use citycard::server::RunningServer;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "citycard", version, about = "Citizen-card transaction server")]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CITYCARD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve terminals (generates a development key set into an empty keys directory).
    Serve(Box<ServeArgs>),
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Settlement reports for auditors (read the journals only: safe beside a running server).
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Audit a data directory offline (the server must be stopped); exits 1 on any finding.
    /// With `--archive DIR`, check an archive by itself instead (a copy on another disk).
    Verify {
        #[arg(long, default_value = "data", env = "CITYCARD_DATA")]
        data: PathBuf,
        /// Keys directory: `assertion.pub` checks the anchors of a pruned archive.
        #[arg(long, default_value = "keys", env = "CITYCARD_KEYS")]
        keys: PathBuf,
        /// Check this archive alone (one shard's segments, an archive root of `shard-N/`, or a
        /// data directory's `shard-N/archive/`), not the data directory: CRCs, hash chain, seq
        /// continuity and money, from the shard's anchor when one lies beside it, else seq 1.
        #[arg(long)]
        archive: Option<PathBuf>,
        /// With `--archive` of one shard: the anchor file to start from.
        #[arg(long, requires = "archive")]
        anchor: Option<PathBuf>,
    },
    /// The journal archive (the server must be stopped).
    Archive {
        #[command(subcommand)]
        command: ArchiveCommand,
    },
    /// Counter console for staff: a web page on loopback (`--listen`), or one operation for
    /// scripts (`citycard counter topup --card N --amount M`).
    Counter(Box<citycard::counter::cli::CounterArgs>),
    /// Disaster-recovery standby: follow the primary's batches from the DR site's PostgreSQL
    /// into this data directory (checked record by record), until SIGTERM.
    Standby(Box<citycard::replicate::cli::StandbyArgs>),
    /// Make a stopped standby the primary, after its PostgreSQL was promoted: raises the
    /// generation (fencing the old primary) and takes in every remaining record.
    Promote(Box<citycard::replicate::cli::PromoteArgs>),
}

/// Settings for `serve` and `config show`. Layers: defaults, then `--config FILE` (TOML), then
/// environment variables, then flags (clap merges the last two: a flag beats its variable).
#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file (see citycard.example.toml).
    #[arg(long, env = "CITYCARD_CONFIG")]
    config: Option<PathBuf>,
    /// Keys directory [default: keys].
    #[arg(long, env = "CITYCARD_KEYS")]
    keys: Option<PathBuf>,
    /// Data directory [default: data].
    #[arg(long, env = "CITYCARD_DATA")]
    data: Option<PathBuf>,
    /// Terminal listener [default: 127.0.0.1:7700].
    #[arg(long, env = "CITYCARD_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin listener for /metrics, /healthz, /readyz [default: 127.0.0.1:7701]. Plain HTTP
    /// on loopback; any other address needs --admin-tls true.
    #[arg(long, env = "CITYCARD_ADMIN")]
    admin: Option<SocketAddr>,
    /// Serve the admin listener over mutual TLS to `monitor` certificates only.
    #[arg(long, env = "CITYCARD_ADMIN_TLS")]
    admin_tls: Option<bool>,
    /// Number of shards [default: number of cores]. Fixed once a data directory exists.
    #[arg(long, env = "CITYCARD_SHARDS")]
    shards: Option<u16>,
    /// Pin each shard thread to a core.
    #[arg(long, env = "CITYCARD_PIN_CORES")]
    pin_cores: Option<bool>,
    /// CRL (PEM) of revoked terminal certificates.
    #[arg(long, env = "CITYCARD_CRL")]
    crl: Option<PathBuf>,
    #[arg(long, env = "CITYCARD_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    #[arg(long, env = "CITYCARD_MAX_IN_FLIGHT")]
    max_in_flight: Option<usize>,
    #[arg(long, env = "CITYCARD_HANDSHAKE_TIMEOUT_MS")]
    handshake_timeout_ms: Option<u64>,
    #[arg(long, env = "CITYCARD_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    #[arg(long, env = "CITYCARD_FRAME_TIMEOUT_MS")]
    frame_timeout_ms: Option<u64>,
    #[arg(long, env = "CITYCARD_WRITE_TIMEOUT_MS")]
    write_timeout_ms: Option<u64>,
    #[arg(long, env = "CITYCARD_QUEUE_DEPTH")]
    queue_depth: Option<usize>,
    #[arg(long, env = "CITYCARD_MAX_BATCH")]
    max_batch: Option<usize>,
    #[arg(long, env = "CITYCARD_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: Option<u64>,
    /// Highest balance a card may hold, minor units.
    #[arg(long, env = "CITYCARD_MAX_BALANCE")]
    max_balance: Option<i64>,
    /// Highest amount of one transaction, minor units.
    #[arg(long, env = "CITYCARD_MAX_AMOUNT")]
    max_amount: Option<i64>,
    #[arg(long, env = "CITYCARD_IDENTITY_TTL_MS")]
    identity_ttl_ms: Option<u64>,
    #[arg(long, env = "CITYCARD_SEGMENT_BYTES")]
    segment_bytes: Option<u64>,
    /// A checkpoint after this many journal records per shard (bounds the replay at start).
    #[arg(long, env = "CITYCARD_CHECKPOINT_RECORDS")]
    checkpoint_records: Option<u64>,
    /// Or after this long, if anything was written.
    #[arg(long, env = "CITYCARD_CHECKPOINT_INTERVAL_MS")]
    checkpoint_interval_ms: Option<u64>,
    /// Where journal segments below a checkpoint go (DIR/shard-N); default data/shard-N/archive.
    #[arg(long, env = "CITYCARD_ARCHIVE")]
    archive: Option<PathBuf>,
    /// Key version cut-off, VERSION=UNIX_MS (repeatable): cards on that version are declined
    /// from then on.
    #[arg(long = "key-cutoff", value_parser = parse_cutoff)]
    key_cutoffs: Vec<(u16, u64)>,
    /// PostgreSQL connection string for `[replicate]` (the environment variable keeps a
    /// password out of the process list).
    #[arg(long, env = "CITYCARD_REPLICATE_CONNINFO")]
    replicate_conninfo: Option<String>,
}

impl ServeArgs {
    /// The effective configuration; an error names the key and the reason.
    fn config(&self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => {
                Settings::from_file(path).map_err(|e| anyhow::anyhow!("configuration: {e}"))?
            }
            None => Settings::default(),
        };
        let cli = Settings {
            listen: self.listen,
            admin: self.admin,
            admin_tls: self.admin_tls,
            keys: self.keys.clone(),
            data: self.data.clone(),
            shards: self.shards,
            pin_cores: self.pin_cores,
            crl: self.crl.clone(),
            max_connections: self.max_connections,
            max_in_flight: self.max_in_flight,
            handshake_timeout_ms: self.handshake_timeout_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            frame_timeout_ms: self.frame_timeout_ms,
            write_timeout_ms: self.write_timeout_ms,
            queue_depth: self.queue_depth,
            max_batch: self.max_batch,
            drain_timeout_ms: self.drain_timeout_ms,
            max_balance: self.max_balance,
            max_amount: self.max_amount,
            identity_ttl_ms: self.identity_ttl_ms,
            key_cache_max: None,
            card_cache_entries: None,
            // Transit limits are set in the configuration file only.
            max_fare: None,
            product: None,
            hold_timeout_ms: None,
            missing_tapout_fare: None,
            reversal_window_ms: None,
            history_retention_days: None,
            segment_bytes: self.segment_bytes,
            checkpoint_records: self.checkpoint_records,
            checkpoint_interval_ms: self.checkpoint_interval_ms,
            archive: self.archive.clone(),
            key_cutoff: (!self.key_cutoffs.is_empty()).then(|| {
                self.key_cutoffs
                    .iter()
                    .map(|(version, after_ms)| KeyCutoff { version: *version, after_ms: *after_ms })
                    .collect()
            }),
            replicate: self.replicate_conninfo.as_ref().map(|conninfo| {
                citycard::replicate::ReplicateSettings {
                    conninfo: Some(conninfo.clone()),
                    ..Default::default()
                }
            }),
        };
        Config::from_layers(&[&file, &cli])
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }
}

#[derive(Subcommand)]
enum ReportCommand {
    /// Per-terminal and per-operation totals of one UTC day as signed CSV; exits 1 if the day
    /// does not reconcile.
    Settlement {
        #[arg(long, default_value = "data", env = "CITYCARD_DATA")]
        data: PathBuf,
        #[arg(long, default_value = "keys", env = "CITYCARD_KEYS")]
        keys: PathBuf,
        /// The day, YYYY-MM-DD (UTC).
        #[arg(long)]
        date: String,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a signed settlement report against assertion.pub.
    Check {
        #[arg(long, default_value = "keys", env = "CITYCARD_KEYS")]
        keys: PathBuf,
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ArchiveCommand {
    /// Remove archived journal segments whose records all lie before DATE (00:00 UTC), behind
    /// a signed anchor per shard (keys/assertion.key) that verify and settlement start from.
    Prune {
        #[arg(long, default_value = "data", env = "CITYCARD_DATA")]
        data: PathBuf,
        #[arg(long, default_value = "keys", env = "CITYCARD_KEYS")]
        keys: PathBuf,
        /// The first day to keep, YYYY-MM-DD (UTC).
        #[arg(long)]
        before: String,
        /// Say what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (defaults, file, environment, flags) as TOML.
    Show(Box<ServeArgs>),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate the development CA, server certificate, issuer and assertion keys, and one
    /// terminal per role. Never overwrites.
    Init {
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
    },
    /// Issue a client certificate (CN = id, OU = role: reader, kiosk, counter, or monitor for
    /// scraping a TLS admin listener).
    Terminal {
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        role: String,
    },
    /// Revoke a terminal certificate: writes crl.pem (serve with --crl DIR/crl.pem; SIGHUP
    /// applies it to a running server).
    Revoke {
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
        #[arg(long)]
        id: String,
    },
    /// Add a new issuer key version; cards issued or replaced after the next start use it.
    RotateIssuer {
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
    },
}

fn parse_cutoff(s: &str) -> Result<(u16, u64), String> {
    let (v, t) = s.split_once('=').ok_or("expected VERSION=UNIX_MS")?;
    Ok((
        v.parse().map_err(|e| format!("version: {e}"))?,
        t.parse().map_err(|e| format!("time: {e}"))?,
    ))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: journald and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(cli.log_format);
    // `verify --archive DIR` checks DIR alone; a `--data` typed beside it would be silently
    // ignored, so it is refused (a CITYCARD_DATA in the environment is not "typed").
    let data_typed = matches
        .subcommand_matches("verify")
        .is_some_and(|m| m.value_source("data") == Some(ValueSource::CommandLine));
    let result = match cli.command {
        Command::Verify { archive: Some(_), .. } if data_typed => Err(anyhow::anyhow!(
            "--data and --archive do not go together: --archive DIR checks that archive alone; \
             `citycard verify --data DIR` checks a data directory's journal together with its \
             archive"
        )),
        Command::Serve(args) => serve(*args),
        Command::Keys { command } => keys_command(command),
        Command::Verify { archive: Some(archive), anchor, keys, .. } => {
            verify_archive(&archive, anchor.as_deref(), &keys)
        }
        Command::Verify { data, keys, .. } => verify(&data, &keys),
        Command::Archive { command: ArchiveCommand::Prune { data, keys, before, dry_run } } => {
            prune(&data, &keys, &before, dry_run)
        }
        Command::Counter(args) => citycard::counter::cli::run(*args),
        Command::Standby(args) => citycard::replicate::cli::standby(*args),
        Command::Promote(args) => citycard::replicate::cli::promote_command(*args),
        Command::Report { command: ReportCommand::Settlement { data, keys, date, out } } => {
            citycard::report::run_settlement(&data, &keys, &date, out.as_deref()).map(
                |reconciled| {
                    if reconciled {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!(
                            "citycard: the day does not reconcile (see the # lines of the report)"
                        );
                        ExitCode::from(1)
                    }
                },
            )
        }
        Command::Report { command: ReportCommand::Check { keys, file } } => {
            citycard::report::run_check(&file, &keys).map(|()| {
                println!("{}: signature OK", file.display());
                ExitCode::SUCCESS
            })
        }
        Command::Config { command: ConfigCommand::Show(args) } => args.config().map(|config| {
            print!("{}", config.render());
            ExitCode::SUCCESS
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("citycard: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn keys_command(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Init { dir } => {
            for path in keys::init(&dir)? {
                println!("wrote {}", path.display());
            }
        }
        KeysCommand::Terminal { dir, id, role } => {
            let id = TerminalId::new(id)?;
            let role: Role = role.parse()?;
            let (cert, key) = keys::issue_terminal(&dir, &id, role)?;
            println!("wrote {} and {}", cert.display(), key.display());
        }
        KeysCommand::Revoke { dir, id } => {
            let crl = keys::revoke(&dir, &TerminalId::new(id)?)?;
            println!(
                "wrote {}; a server running with --crl {} applies it on SIGHUP (open connections of the terminal are closed)",
                crl.display(),
                crl.display()
            );
        }
        KeysCommand::RotateIssuer { dir } => {
            let version = keys::add_issuer_version(&dir)?;
            println!(
                "added issuer key version {version}; send SIGHUP to the server (or restart it) to issue cards with it"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn prune(
    data: &std::path::Path,
    keys: &std::path::Path,
    before: &str,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let options = citycard::archive::PruneOptions {
        before: citycard::report::Date::parse(before)?,
        dry_run,
        now_ms: citycard::now_ms(),
        stop_after_anchor: false,
    };
    let verb = if dry_run { "would remove" } else { "removed" };
    for shard in citycard::archive::prune(data, keys, &options)? {
        println!(
            "shard {}: {verb} {} segment(s), {} bytes ({} left by an interrupted prune); anchor at seq {}; stopped: {}",
            shard.shard,
            shard.segments.len(),
            shard.bytes,
            shard.leftovers,
            shard.anchor_seq,
            shard.stopped
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `assertion.pub` of `keys`, when there is one (it checks prune anchors).
fn assertion_public(keys: &std::path::Path) -> anyhow::Result<Option<[u8; 32]>> {
    let public_path = keys.join(keys::ASSERTION_PUB);
    Ok(if public_path.exists() { Some(keys::load_assertion_public(&public_path)?) } else { None })
}

fn verify_archive(
    archive: &std::path::Path,
    anchor: Option<&std::path::Path>,
    keys: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let public = assertion_public(keys)?;
    let report = citycard::archive::check::check_archive(archive, anchor, public.as_ref())?;
    println!("{report}");
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn verify(data: &std::path::Path, keys: &std::path::Path) -> anyhow::Result<ExitCode> {
    let public = assertion_public(keys)?;
    let report = citycard::verify::verify_with(data, public.as_ref())?;
    let t = report.totals;
    println!(
        "records {} cards {} | deposits {} top-ups {} purchases {} offline {} refunds {} | sum of balances {}",
        t.records, t.cards, t.deposits, t.top_ups, t.purchases, t.offline, t.refunds, t.balances
    );
    println!(
        "card deposits: paid {} paid back {} kept {} | held {}",
        t.card_deposits_paid, t.card_deposits_refunded, t.card_deposits_kept, t.card_deposits
    );
    for torn in &report.torn_tails {
        println!("note: torn tail {torn}");
    }
    for (shard, seq, head) in &report.heads {
        println!("shard {shard}: last seq {seq} head {}", citycard::hex::encode(head));
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    if report.ok() {
        println!("verify: OK");
        Ok(ExitCode::SUCCESS)
    } else {
        for problem in &report.problems {
            println!("MISMATCH: {problem}");
        }
        println!("verify: {} problem(s)", report.problems.len());
        Ok(ExitCode::from(1))
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = args.config()?;
    if !keys::has_keys(&config.keys_dir) {
        tracing::warn!(dir = %config.keys_dir.display(), "no keys found: generating a DEVELOPMENT key set; never use it in production");
        keys::init(&config.keys_dir).context("generating development keys")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("citycard-io")
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let health = Health::new();
        let trust = Trust::load(&config).context("loading TLS material")?;
        let admin_trust = config.admin_tls.then(|| trust.clone());
        let admin = admin::spawn(config.admin, health.clone(), admin_trust).await?;
        let scheme = if config.admin_tls { "https" } else { "http" };
        tracing::info!(%admin, scheme, "admin listener (metrics, healthz, readyz)");
        let server = match RunningServer::start_with_trust(config, trust).await {
            Ok(server) => server,
            Err(e) => {
                health.set(State::Failed);
                if storage_environment_fault(&e) {
                    // The disk, not the data: say so, keep the state, and exit with a code of
                    // its own so the operator (or a unit's ExecStopPost) can tell the two apart.
                    tracing::error!(error = %format!("{e:#}"), "storage error at start; refusing to start, the state is kept as it is");
                    eprintln!("citycard: error: {e:#}");
                    return Ok(ExitCode::from(EXIT_STORAGE_AT_START));
                }
                tracing::error!(error = %format!("{e:#}"), "start failed");
                return Err(e);
            }
        };
        health.attach(server.shared());
        health.set(State::Ready);
        println!("citycard listening on {}", server.local_addr);
        notify_systemd("READY=1");
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut hangup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("SIGINT: draining");
                    break;
                }
                _ = term.recv() => {
                    tracing::info!("SIGTERM: draining");
                    break;
                }
                _ = hangup.recv() => {
                    match server.reload_keys() {
                        Ok(version) => tracing::info!(current_version = version, "SIGHUP: issuer keys reloaded"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: key reload failed; keeping the old keys"),
                    }
                    match server.reload_trust() {
                        Ok(done) => tracing::info!(
                            revoked_certificates = done.revoked_certificates,
                            connections_closed = done.connections_closed,
                            "SIGHUP: CRL and TLS configuration reloaded"
                        ),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: CRL or TLS reload failed; keeping the old ones"),
                    }
                }
                _ = server.failed() => {
                    health.set(State::Failed);
                    tracing::error!("storage failure: exiting without draining");
                    return Ok(ExitCode::from(70));
                }
            }
        }
        health.set(State::Draining);
        notify_systemd("STOPPING=1");
        server.stop().await?;
        tracing::info!("stopped cleanly");
        Ok(ExitCode::SUCCESS)
    })
}

/// Exit status when the start is refused because storage failed (disk full, I/O error,
/// permissions, read-only filesystem): EX_IOERR of sysexits.h.
const EXIT_STORAGE_AT_START: u8 = 74;

/// Whether a start failure is the environment's fault rather than the data's.
fn storage_environment_fault(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<citycard::engine::StoreError>().is_some_and(|e| e.is_environment())
            || cause.downcast_ref::<citycard::journal::JournalError>().is_some_and(|e| {
                matches!(e, citycard::journal::JournalError::Io { source, .. }
                    if citycard::engine::recovery::is_environment(source))
            })
    })
}

/// Tells systemd (Type=notify) about readiness; a no-op outside systemd.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else { return };
    if let Err(e) = socket.send_to(state.as_bytes(), &path) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}
