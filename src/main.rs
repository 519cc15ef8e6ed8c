//! The `citycard` binary: argument parsing only; everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use citycard::config::Config;
use citycard::keys::{self, Role, TerminalId};
use citycard::server::RunningServer;
use clap::{Parser, Subcommand, ValueEnum};

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
    /// Audit a data directory offline (the server must be stopped); exits 1 on any finding.
    Verify {
        #[arg(long, default_value = "data", env = "CITYCARD_DATA")]
        data: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, default_value = "keys", env = "CITYCARD_KEYS")]
    keys: PathBuf,
    #[arg(long, default_value = "data", env = "CITYCARD_DATA")]
    data: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7700", env = "CITYCARD_LISTEN")]
    listen: SocketAddr,
    /// Number of shards (default: number of cores). Fixed once a data directory exists.
    #[arg(long, env = "CITYCARD_SHARDS")]
    shards: Option<u16>,
    /// Pin each shard thread to a core.
    #[arg(long, env = "CITYCARD_PIN_CORES")]
    pin_cores: bool,
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
    /// Key version cut-off, VERSION=UNIX_MS (repeatable): cards on that version are declined
    /// from then on.
    #[arg(long = "key-cutoff", value_parser = parse_cutoff)]
    key_cutoffs: Vec<(u16, u64)>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate the development CA, server certificate, issuer and assertion keys, and one
    /// terminal per role. Never overwrites.
    Init {
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
    },
    /// Issue a terminal certificate (CN = id, OU = role).
    Terminal {
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        role: String,
    },
    /// Revoke a terminal certificate: writes crl.pem (serve with --crl DIR/crl.pem).
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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Keys { command } => keys_command(command),
        Command::Verify { data } => verify(&data),
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
            println!("wrote {} (restart the server with --crl {})", crl.display(), crl.display());
        }
        KeysCommand::RotateIssuer { dir } => {
            let version = keys::add_issuer_version(&dir)?;
            println!(
                "added issuer key version {version}; restart the server to issue cards with it"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(data: &std::path::Path) -> anyhow::Result<ExitCode> {
    let report = citycard::verify::verify(data)?;
    let t = report.totals;
    println!(
        "records {} cards {} | deposits {} top-ups {} purchases {} offline {} refunds {} | sum of balances {}",
        t.records, t.cards, t.deposits, t.top_ups, t.purchases, t.offline, t.refunds, t.balances
    );
    for torn in &report.torn_tails {
        println!("note: torn tail {torn}");
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
    let mut config = Config {
        listen: args.listen,
        keys_dir: args.keys,
        data_dir: args.data,
        shards: args.shards,
        pin_cores: args.pin_cores,
        crl: args.crl,
        key_cutoffs: args.key_cutoffs,
        ..Config::default()
    };
    macro_rules! set {
        ($($field:ident),*) => { $(if let Some(v) = args.$field { config.$field = v; })* };
    }
    set!(
        max_connections,
        max_in_flight,
        handshake_timeout_ms,
        idle_timeout_ms,
        frame_timeout_ms,
        queue_depth,
        max_batch,
        drain_timeout_ms
    );
    if let Some(v) = args.max_balance {
        config.limits.max_balance = v;
    }
    if let Some(v) = args.max_amount {
        config.limits.max_amount = v;
    }
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
        let server = RunningServer::start(config).await?;
        println!("citycard listening on {}", server.local_addr);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = server.failed() => {
                tracing::error!("storage failure: exiting without draining");
                return Ok(ExitCode::from(70));
            }
        }
        server.stop().await?;
        tracing::info!("stopped cleanly");
        Ok(ExitCode::SUCCESS)
    })
}
