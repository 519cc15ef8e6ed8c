//! The command line: every option of a run, its default and its help text (clap). The binary
//! parses it; [`crate::run::main`] carries it out, and tests build one with
//! `Options::try_parse_from`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::mix::{Mix, DEFAULT_MIX};

const ABOUT: &str = "Load generator for citycard: simulated terminals and cards over mutual TLS";

const LONG_ABOUT: &str = "\
Load generator for citycard: simulated terminals and cards speaking the real protocol over \
mutual TLS with the generated terminal certificates.

Setup: issues --cards cards through a counter terminal (counter-1), 64 issues pipelined, each \
with --deposit; keeps every card's key and counter (ATC) as a card would.

Load: --connections workers. Each worker is one simulated terminal pair: a reader connection \
(purchases, balance inquiries) and, when the mix has top-ups or identity requests, a kiosk \
connection for those. A worker keeps at most --pipeline requests in flight over its two \
connections together, and at most one per card: the cards are split evenly between the \
workers. Closed loop (default): a new request as soon as one is answered. Open loop \
(--rate R): R requests per second in total on a fixed schedule; latency is measured from each \
request's intended send time (coordinated-omission corrected, as wrk2 does).

Certificates: with --spawn each worker gets its own terminals reader-N and kiosk-N (created \
with `citycard keys terminal`). Without it the certificates found in KEYS/terminals are used \
round robin, by file name: reader*, kiosk*, counter* (a certificate may serve many \
connections). The terminal id is the file stem, which must equal the certificate CN.

A request unanswered within --timeout counts as a timeout; its card leaves the load and its \
expected balance accepts either outcome. --verify reads every card's balance at the end and \
compares it with the tester's own reckoning (tap-out fares and reversals included, holds \
being part of the balance); it also flags answers during the load whose balance disagrees \
with an exact reckoning, and inquiries that do not return the original answer. Response MACs \
(an inquiry's embedded original answer's too) are always checked.

Exit status: 0 when there were no errors, timeouts or mismatches, 1 otherwise, 2 when the run \
could not be done.";

#[derive(Parser, Debug)]
#[command(name = "citycard-loadtest", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Options {
    /// Server address (ignored with --spawn).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub server: String,
    /// Keys directory: ca.pem and terminals/*.pem|key (ignored with --spawn).
    #[arg(long, default_value = "keys")]
    pub keys: PathBuf,
    /// Cards to issue before the load.
    #[arg(long, default_value_t = 10_000)]
    pub cards: usize,
    /// Initial deposit of each card, minor units.
    #[arg(long, default_value_t = 50_000)]
    pub deposit: i64,
    /// Workers (simulated terminals), each a reader connection plus a kiosk connection when the
    /// mix needs one.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Requests in flight per worker [default: 1 closed loop, 64 open loop].
    #[arg(long)]
    pub pipeline: Option<usize>,
    /// Measured load time (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before the measured window (not counted).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Open loop: total requests per second over all workers.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Operation weights: purchase, balance, topup, identity, and (protocol 1.2) tapin,
    /// tapout, inquiry, reversal. A card with an open hold taps out when tapin is picked and
    /// taps in when tapout is picked; reversal reverses the card's last approved purchase
    /// (else it is a purchase); inquiry asks for the answer to the card's last answered
    /// consuming request and must get it back (else it is a balance inquiry).
    #[arg(long, default_value = DEFAULT_MIX, value_parser = Mix::parse)]
    pub mix: Mix,
    /// Seed of the deterministic random choices (operations, cards, amounts, nonces).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A request unanswered this long is a timeout; also bounds the drain after the load.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Start a fresh `citycard serve` (temporary data and keys, 127.0.0.1:0) and stop it after.
    #[arg(long)]
    pub spawn: bool,
    /// Run against the floor instead: an echo server in this process with the real server's
    /// TLS (fresh certificates from `citycard keys init`) and frame sizes, which decides
    /// nothing and writes nothing. Its throughput and CPU are the ceiling citycard is read
    /// against.
    #[arg(long)]
    pub floor: bool,
    /// The citycard binary for --spawn and --floor [default: next to this executable].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Extra argument for `citycard serve` with --spawn (repeatable, e.g.
    /// --server-arg=--shards=2).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// Check every card's balance at the end against the tester's reckoning.
    #[arg(long)]
    pub verify: bool,
    /// Write the summary as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the latency percentile distribution (HdrHistogram text format, ms).
    #[arg(long)]
    pub hgrm: Option<PathBuf>,
    /// Draw the latency percentile curve as PNG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No live progress line even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

/// Parses `10s`, `500ms`, `2m`, `1.5s`, `250us`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected a number with a unit, e.g. 10s or 500ms"))?;
    let seconds = match unit.trim() {
        "" | "s" | "sec" => value,
        "ms" => value / 1e3,
        "us" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("`{text}`: unknown unit `{other}` (us, ms, s, m, h)")),
    };
    if !seconds.is_finite() || !(0.0..=86_400.0 * 7.0).contains(&seconds) {
        return Err(format!("`{text}`: out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1e9h").is_err());
    }

    #[test]
    fn args_parse_with_defaults() {
        let args = Options::try_parse_from(["citycard-loadtest"]).expect("defaults");
        assert_eq!(args.server, "127.0.0.1:7700");
        assert_eq!(args.cards, 10_000);
        assert_eq!(args.connections, 8);
        assert_eq!(args.duration, Duration::from_secs(10));
        assert_eq!(args.mix, Mix::parse(DEFAULT_MIX).expect("mix"));
        let args = Options::try_parse_from([
            "citycard-loadtest",
            "--spawn",
            "--server-arg",
            "--shards",
            "--server-arg",
            "2",
            "--rate",
            "5000",
        ])
        .expect("server args");
        assert_eq!(args.server_args, vec!["--shards", "2"]);
        assert_eq!(args.rate, Some(5000.0));
        assert!(Options::try_parse_from(["citycard-loadtest", "--mix", "bogus=1"]).is_err());
    }
}
