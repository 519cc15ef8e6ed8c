//! `citycard counter`: the web console (`--listen`) or one operation for scripts, printing
//! the server's answer as text or `--json`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use citycard_client::{Client, Config};
use citycard_protocol::{Amount, BlockReason};

use super::cards::DevCards;
use super::ops::{parse_amount, parse_card, parse_reason, Answer, Counter, Op};

/// Exit status of a script operation the server declined (0 = approved, 1 = no answer).
pub const EXIT_DECLINED: u8 = 3;

#[derive(clap::Args)]
pub struct CounterArgs {
    /// The citycard server (host:port).
    #[arg(long, global = true, default_value = "127.0.0.1:7700", env = "CITYCARD_SERVER")]
    server: String,
    /// Keys directory holding ca.pem and terminals/<cert>.pem/.key.
    #[arg(long, global = true, default_value = "keys", env = "CITYCARD_KEYS")]
    keys: PathBuf,
    /// The counter terminal's certificate name (its CN, e.g. counter-1).
    #[arg(long, global = true, default_value = "counter-1")]
    cert: String,
    /// Name the server certificate is valid for.
    #[arg(long, global = true, default_value = "localhost")]
    server_name: String,
    /// DEVELOPMENT ONLY: simulate the card at the counter (top-up, balance, history need its
    /// cryptogram) by deriving card keys from this issuer.key. Never on a production desk.
    #[arg(long, global = true)]
    dev_card_keys: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Where the web console listens (loopback only).
    #[arg(long, default_value = "127.0.0.1:7702")]
    listen: SocketAddr,
    #[command(subcommand)]
    op: Option<CounterOp>,
}

#[derive(clap::Subcommand)]
enum CounterOp {
    /// Issue a new card with a deposit.
    Issue {
        /// Deposit in currency units (20 or 20.50).
        #[arg(long, default_value = "0", value_parser = parse_amount)]
        deposit: Amount,
        #[command(flatten)]
        op_ref: OpRef,
    },
    /// Top up a card (needs the card: see --dev-card-keys).
    Topup {
        #[arg(long, value_parser = parse_card)]
        card: citycard_protocol::CardId,
        /// Amount in currency units (20 or 20.50).
        #[arg(long, value_parser = parse_amount)]
        amount: Amount,
    },
    /// A card's balance (read with History; needs the card).
    Balance {
        #[arg(long, value_parser = parse_card)]
        card: citycard_protocol::CardId,
    },
    /// A card's history, newest first (needs the card).
    History {
        #[arg(long, value_parser = parse_card)]
        card: citycard_protocol::CardId,
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=64))]
        limit: u16,
        /// Entries older than this journal sequence (the "older entries" value of a page).
        #[arg(long, default_value_t = 0)]
        before: u64,
    },
    /// Block a card.
    Block {
        #[arg(long, value_parser = parse_card)]
        card: citycard_protocol::CardId,
        /// lost, stolen, damaged, fraud or other.
        #[arg(long, value_parser = parse_reason)]
        reason: BlockReason,
        #[command(flatten)]
        op_ref: OpRef,
    },
    /// Unblock a blocked card.
    Unblock {
        #[arg(long, value_parser = parse_card)]
        card: citycard_protocol::CardId,
        #[command(flatten)]
        op_ref: OpRef,
    },
    /// Replace a card by a new one carrying its balance.
    Replace {
        #[arg(long, value_parser = parse_card)]
        card: citycard_protocol::CardId,
        #[command(flatten)]
        op_ref: OpRef,
    },
    /// Close a card and refund its balance and card deposit.
    Close {
        #[arg(long, value_parser = parse_card)]
        card: citycard_protocol::CardId,
        #[command(flatten)]
        op_ref: OpRef,
    },
    /// Change a card's product (protocol 1.3; e.g. register an anonymous card). The answer says
    /// what deposit difference to take or pay back.
    SetProduct {
        #[arg(long, value_parser = parse_card)]
        card: citycard_protocol::CardId,
        /// The product id of the server's `[[product]]` table (0..=31).
        #[arg(long)]
        product: u8,
        #[command(flatten)]
        op_ref: OpRef,
    },
}

#[derive(clap::Args)]
struct OpRef {
    /// The staff operation's reference; repeat the op_ref a previous run printed to retry that
    /// operation safely (same answer, done once). Default: a fresh random one.
    #[arg(long)]
    op_ref: Option<u64>,
}

impl OpRef {
    fn value(&self) -> u64 {
        self.op_ref.unwrap_or_else(random_op_ref)
    }
}

fn random_op_ref() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    match ring::rand::SystemRandom::new().fill(&mut bytes) {
        Ok(()) => u64::from_be_bytes(bytes),
        // The clock in nanoseconds differs between two runs of one desk's scripts.
        Err(_) => crate::now_ms().wrapping_mul(1_000_000),
    }
}

fn op_of(op: &CounterOp) -> (Op, u64) {
    match op {
        CounterOp::Issue { deposit, op_ref } => (Op::Issue { deposit: *deposit }, op_ref.value()),
        CounterOp::Topup { card, amount } => (Op::TopUp { card: *card, amount: *amount }, 0),
        CounterOp::Balance { card } => (Op::Balance { card: *card }, 0),
        CounterOp::History { card, limit, before } => {
            (Op::History { card: *card, before_seq: *before, limit: *limit }, 0)
        }
        CounterOp::Block { card, reason, op_ref } => {
            (Op::Block { card: *card, reason: *reason }, op_ref.value())
        }
        CounterOp::Unblock { card, op_ref } => (Op::Unblock { card: *card }, op_ref.value()),
        CounterOp::Replace { card, op_ref } => (Op::Replace { card: *card }, op_ref.value()),
        CounterOp::Close { card, op_ref } => (Op::Close { card: *card }, op_ref.value()),
        CounterOp::SetProduct { card, product, op_ref } => {
            (Op::SetProduct { card: *card, product: *product }, op_ref.value())
        }
    }
}

/// Runs `citycard counter ...`.
pub fn run(args: CounterArgs) -> anyhow::Result<ExitCode> {
    if args.op.is_none() && !args.listen.ip().is_loopback() {
        return Err(super::web::NotLoopback(args.listen).into());
    }
    let mut config = Config::from_keys_dir(args.server.clone(), &args.keys, &args.cert)
        .with_context(|| format!("loading the counter certificate {}", args.cert))?;
    config.server_name = args.server_name.clone();
    let client = Client::new(config)?;
    let cards = match &args.dev_card_keys {
        Some(path) => {
            tracing::warn!(path = %path.display(), "simulating cards from issuer keys: DEVELOPMENT ONLY");
            Some(DevCards::load(path)?)
        }
        None => None,
    };
    let counter = Counter { client, cards };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("citycard-counter")
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        match &args.op {
            Some(op) => {
                let (op, op_ref) = op_of(op);
                let answer = counter.run(&op, op_ref).await;
                print_answer(&answer, args.json)?;
                Ok(exit_code(&answer))
            }
            None => {
                let shutdown = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                let sigterm = async {
                    use tokio::signal::unix::{signal, SignalKind};
                    match signal(SignalKind::terminate()) {
                        Ok(mut term) => {
                            term.recv().await;
                        }
                        Err(_) => std::future::pending::<()>().await,
                    }
                };
                let stop = async move {
                    tokio::select! { _ = shutdown => {}, _ = sigterm => {} }
                };
                super::web::serve(counter, args.listen, stop, |addr| {
                    println!("counter console on http://{addr}/");
                })
                .await?;
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

fn print_answer(answer: &Answer, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(answer)?);
    } else {
        print!("{}", answer.to_text());
    }
    Ok(())
}

fn exit_code(answer: &Answer) -> ExitCode {
    match (answer.approved, answer.status) {
        (true, _) => ExitCode::SUCCESS,
        (false, "Error") => ExitCode::FAILURE,
        (false, _) => ExitCode::from(EXIT_DECLINED),
    }
}
