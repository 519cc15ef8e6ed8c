//! `citycard-loadtest`: simulated terminals and cards speaking the real citycard protocol over
//! mutual TLS, with HDR latency reports. This file parses arguments and runs the phases; the
//! work is in the modules.

mod client;
mod plot;
mod report;
mod server;
mod workload;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::time::Instant;

use report::{RunInfo, Stats, Summary};
use workload::{Live, Mix, Plan, Rng, Terminal, Timeline, WorkerSpec, DEFAULT_MIX};

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
compares it with the tester's own reckoning; it also flags answers during the load whose \
balance disagrees with an exact reckoning. Response MACs are always checked.

Exit status: 0 when there were no errors, timeouts or mismatches, 1 otherwise, 2 when the run \
could not be done.";

#[derive(Parser, Debug)]
#[command(name = "citycard-loadtest", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Args {
    /// Server address (ignored with --spawn).
    #[arg(long, default_value = "127.0.0.1:7700")]
    server: String,
    /// Keys directory: ca.pem and terminals/*.pem|key (ignored with --spawn).
    #[arg(long, default_value = "keys")]
    keys: PathBuf,
    /// Cards to issue before the load.
    #[arg(long, default_value_t = 10_000)]
    cards: usize,
    /// Initial deposit of each card, minor units.
    #[arg(long, default_value_t = 50_000)]
    deposit: i64,
    /// Workers (simulated terminals), each a reader connection plus a kiosk connection when the
    /// mix needs one.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests in flight per worker [default: 1 closed loop, 64 open loop].
    #[arg(long)]
    pipeline: Option<usize>,
    /// Measured load time (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before the measured window (not counted).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: Duration,
    /// Open loop: total requests per second over all workers.
    #[arg(long)]
    rate: Option<f64>,
    /// Operation weights.
    #[arg(long, default_value = DEFAULT_MIX, value_parser = Mix::parse)]
    mix: Mix,
    /// Seed of the deterministic random choices (operations, cards, amounts, nonces).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A request unanswered this long is a timeout; also bounds the drain after the load.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Start a fresh `citycard serve` (temporary data and keys, 127.0.0.1:0) and stop it after.
    #[arg(long)]
    spawn: bool,
    /// The citycard binary for --spawn [default: next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Extra argument for `citycard serve` with --spawn (repeatable, e.g.
    /// --server-arg=--shards=2).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Check every card's balance at the end against the tester's reckoning.
    #[arg(long)]
    verify: bool,
    /// Write the summary as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the latency percentile distribution (HdrHistogram text format, ms).
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Draw the latency percentile curve as PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No live progress line even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

/// Parses `10s`, `500ms`, `2m`, `1.5s`, `250us`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
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

/// Terminal ids (certificate file stems) in `keys/terminals` whose name starts with `prefix`,
/// in numeric order of their suffix.
fn terminals_with_prefix(keys: &Path, prefix: &str) -> anyhow::Result<Vec<String>> {
    let dir = keys.join("terminals");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pem") {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if stem.starts_with(prefix) && path.with_extension("key").is_file() {
            ids.push(stem.to_owned());
        }
    }
    ids.sort_by_key(|id| {
        let digits: String = id.chars().rev().take_while(char::is_ascii_digit).collect();
        let n: u64 = digits.chars().rev().collect::<String>().parse().unwrap_or(0);
        (n, id.clone())
    });
    Ok(ids)
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Where the run happens: the server address and its keys.
struct Target {
    addr: String,
    keys: PathBuf,
    server_pid: Option<String>,
}

struct Outcome {
    summary: Summary,
    hist: Histogram<u64>,
}

fn progress_bar(enabled: bool) -> Option<indicatif::ProgressBar> {
    if !enabled {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

async fn run(args: &Args, target: &Target) -> anyhow::Result<Outcome> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if let Some(rate) = args.rate {
        if !(rate > 0.0 && rate.is_finite()) {
            bail!("--rate must be a positive number");
        }
    }
    let pipeline = args.pipeline.unwrap_or(if args.rate.is_some() { 64 } else { 1 });
    if pipeline == 0 {
        bail!("--pipeline must be at least 1");
    }
    if args.cards < args.connections {
        bail!(
            "--cards {} is fewer than --connections {}: every worker needs cards",
            args.cards,
            args.connections
        );
    }
    if args.cards < args.connections * pipeline {
        eprintln!(
            "note: {} cards for {} workers x pipeline {}: workers will wait for free cards",
            args.cards, args.connections, pipeline
        );
    }
    let needs_kiosk = args.mix.needs_kiosk();
    let n = args.connections;

    // Terminals.
    let (readers, kiosks, counter) = if target.server_pid.is_some() && args.spawn {
        let readers: Vec<String> = (1..=n).map(|i| format!("reader-{i}")).collect();
        let kiosks: Vec<String> = (1..=n).map(|i| format!("kiosk-{i}")).collect();
        (readers, kiosks, "counter-1".to_owned())
    } else {
        let readers = terminals_with_prefix(&target.keys, "reader")?;
        let kiosks = terminals_with_prefix(&target.keys, "kiosk")?;
        let counters = terminals_with_prefix(&target.keys, "counter")?;
        if readers.is_empty() {
            bail!("no reader certificate in {}/terminals", target.keys.display());
        }
        if needs_kiosk && kiosks.is_empty() {
            bail!(
                "the mix has top-ups or identity but {}/terminals has no kiosk certificate",
                target.keys.display()
            );
        }
        let counter = counters.first().cloned().ok_or_else(|| {
            anyhow!("no counter certificate in {}/terminals", target.keys.display())
        })?;
        (readers, kiosks, counter)
    };
    let mut configs: HashMap<String, Terminal> = HashMap::new();
    let mut terminal = |id: &str| -> anyhow::Result<Terminal> {
        if let Some(t) = configs.get(id) {
            return Ok(t.clone());
        }
        let t = Terminal { id: id.to_owned(), config: client::client_config(&target.keys, id)? };
        configs.insert(id.to_owned(), t.clone());
        Ok(t)
    };
    let counter = terminal(&counter)?;

    // Setup: issue the cards.
    let setup_started = Instant::now();
    println!("issuing {} cards through {} at {} ...", args.cards, counter.id, target.addr);
    let cards = workload::issue_cards(
        &target.addr,
        &counter,
        args.cards,
        args.deposit,
        now_ns(),
        args.timeout,
    )
    .await?;
    let setup_s = setup_started.elapsed().as_secs_f64();

    // Workers, each with its share of the cards.
    let plan = Arc::new(Plan {
        addr: target.addr.clone(),
        mix: args.mix.clone(),
        pipeline,
        worker_rate: args.rate.map(|r| r / n as f64),
        timeout: args.timeout,
        verify: args.verify,
    });
    let live = Arc::new(Live::new()?);
    let ready = Arc::new(tokio::sync::Barrier::new(n + 1));
    let (start_tx, start_rx) = tokio::sync::watch::channel(None::<Timeline>);
    let mut shares: Vec<Vec<workload::Card>> = (0..n).map(|_| Vec::new()).collect();
    for (i, card) in cards.into_iter().enumerate() {
        shares[i % n].push(card);
    }
    let mut seeder = Rng::new(args.seed);
    let mut handles = Vec::with_capacity(n);
    let mut reader_ids = std::collections::BTreeSet::new();
    let mut kiosk_ids = std::collections::BTreeSet::new();
    for (index, share) in shares.into_iter().enumerate() {
        let reader = terminal(&readers[index % readers.len()])?;
        let kiosk = if needs_kiosk && !kiosks.is_empty() {
            Some(terminal(&kiosks[index % kiosks.len()])?)
        } else {
            None
        };
        reader_ids.insert(reader.id.clone());
        if let Some(k) = &kiosk {
            kiosk_ids.insert(k.id.clone());
        }
        let spec = WorkerSpec { index, reader, kiosk, cards: share, seed: seeder.next_u64() };
        handles.push(tokio::spawn(workload::run_worker(
            spec,
            plan.clone(),
            live.clone(),
            ready.clone(),
            start_rx.clone(),
        )));
    }
    // Every worker has connected (or failed to): start together.
    ready.wait().await;
    let start = Instant::now() + Duration::from_millis(20);
    let timeline = Timeline {
        start,
        measure_start: start + args.warmup,
        deadline: start + args.warmup + args.duration,
    };
    let _ = start_tx.send(Some(timeline));
    let mode = if args.rate.is_some() { "open loop" } else { "closed loop" };
    println!(
        "{mode}: {n} workers ({} reader, {} kiosk connections; {} + {} distinct terminals), pipeline {pipeline}, {:?}{}",
        n,
        if needs_kiosk { n } else { 0 },
        reader_ids.len(),
        kiosk_ids.len(),
        args.duration,
        if args.warmup.is_zero() { String::new() } else { format!(" after {:?} warm-up", args.warmup) }
    );

    // Server and own CPU over the measured window.
    let server_pid = target.server_pid.clone();
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(timeline.measure_start).await;
        let before = (server_pid.as_deref().and_then(server::cpu_ticks), server::cpu_ticks("self"));
        tokio::time::sleep_until(timeline.deadline).await;
        let after = (server_pid.as_deref().and_then(server::cpu_ticks), server::cpu_ticks("self"));
        (before, after)
    });

    // Live progress.
    let bar = progress_bar(std::io::stdout().is_terminal() && !args.no_progress);
    let mut stats = Stats::new()?;
    let mut cards_back = 0usize;
    {
        let mut joined = futures_util::future::join_all(handles);
        let mut joined = std::pin::Pin::new(&mut joined);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last = (Instant::now(), 0u64);
        let results = loop {
            tokio::select! {
                results = &mut joined => break results,
                _ = tick.tick() => {
                    if let Some(bar) = &bar {
                        let now = Instant::now();
                        let answered = live.answered.load(Ordering::Relaxed);
                        let rate = (answered - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
                        last = (now, answered);
                        let p99 = live.hist.lock().ok().filter(|h| !h.is_empty()).map(|h| h.value_at_quantile(0.99));
                        let phase = if now < timeline.measure_start { "warm-up" } else if now < timeline.deadline { "load" } else if args.verify { "drain/verify" } else { "drain" };
                        bar.set_message(format!(
                            "{phase} {:.1}s | {:.0} req/s | p99 {} | errors+timeouts {}",
                            now.saturating_duration_since(timeline.start).as_secs_f64(),
                            rate,
                            p99.map_or("-".into(), |v| format!("{:.3} ms", v as f64 / 1000.0)),
                            live.errors.load(Ordering::Relaxed)
                        ));
                    }
                }
            }
        };
        for result in results {
            let (worker_stats, cards) = result.map_err(|e| anyhow!("a worker panicked: {e}"))??;
            stats.merge(&worker_stats);
            cards_back += cards.len();
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(e) = &stats.first_connect_error {
        eprintln!("first connection problem: {e}");
    }
    let ((server_before, self_before), (server_after, self_after)) =
        cpu.await.map_err(|e| anyhow!("cpu sampler: {e}"))?;
    let tick_us = 1e6 / server::clock_ticks_per_second() as f64;
    let delta = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if b >= a => Some((b - a) as f64 * tick_us),
        _ => None,
    };
    let info = RunInfo {
        mode: mode.to_owned(),
        server: target.addr.clone(),
        spawned: args.spawn,
        server_args: args.server_args.clone(),
        connections: n,
        reader_connections: n,
        kiosk_connections: if needs_kiosk { n } else { 0 },
        pipeline,
        rate: args.rate,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        timeout_s: args.timeout.as_secs_f64(),
        cards: cards_back,
        deposit: args.deposit,
        mix: args.mix.to_string(),
        seed: args.seed,
        verify: args.verify,
        setup_s,
    };
    let summary = report::summarize(
        &info,
        &stats,
        delta(server_before, server_after),
        delta(self_before, self_after),
    );
    Ok(Outcome { summary, hist: stats.hist })
}

fn write_outputs(args: &Args, outcome: &Outcome) -> anyhow::Result<()> {
    let s = &outcome.summary;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(s)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.hgrm {
        let mut out = Vec::new();
        report::write_hgrm(&outcome.hist, 1000.0, &mut out)?;
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let rate = s.rate.map_or(String::new(), |r| format!(" {r}/s"));
        let title = format!(
            "{}{rate}, {} conns, pipeline {}: {:.0} tx/s",
            s.mode, s.connections, s.pipeline, s.throughput_tps
        );
        plot::write_png(&outcome.hist, &title, path)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("citycard-loadtest: error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let spawned = if args.spawn {
        let readers = args.connections;
        let kiosks = if args.mix.needs_kiosk() { args.connections } else { 1 };
        let started = server::server_binary(args.server_bin.as_deref()).and_then(|bin| {
            println!(
                "spawning {} serve (creating {} terminal certificates) ...",
                bin.display(),
                readers.saturating_sub(1) + kiosks.saturating_sub(1)
            );
            server::Spawned::start(&bin, readers, kiosks, &args.server_args)
        });
        match started {
            Ok(s) => {
                println!("server pid {} listening on {}", s.pid, s.addr);
                Some(s)
            }
            Err(e) => {
                eprintln!("citycard-loadtest: error: {e:#}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let target = match &spawned {
        Some(s) => Target {
            addr: s.addr.clone(),
            keys: s.keys.clone(),
            server_pid: Some(s.pid.to_string()),
        },
        None => Target { addr: args.server.clone(), keys: args.keys.clone(), server_pid: None },
    };
    let result = runtime.block_on(run(&args, &target));
    drop(runtime);
    let mut server_exit = None;
    let mut server_problems = Vec::new();
    if let Some(s) = spawned {
        server_problems = s.log_problems(10);
        server_exit = Some(match s.stop(Duration::from_secs(20)) {
            Ok(text) => text,
            Err(e) => format!("stopping failed: {e:#}"),
        });
    }
    let mut outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("citycard-loadtest: error: {e:#}");
            if let Some(exit) = server_exit {
                eprintln!("server {exit}");
            }
            for line in &server_problems {
                eprintln!("server log: {line}");
            }
            return ExitCode::from(2);
        }
    };
    outcome.summary.server_exit = server_exit;
    print!("{}", report::render_text(&outcome.summary));
    for line in &server_problems {
        println!("server log: {line}");
    }
    if let Err(e) = write_outputs(&args, &outcome) {
        eprintln!("citycard-loadtest: error: {e:#}");
        return ExitCode::from(2);
    }
    let s = &outcome.summary;
    if s.errors > 0 || s.timeouts > 0 || s.verify_mismatches > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
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
        let args = Args::try_parse_from(["citycard-loadtest"]).expect("defaults");
        assert_eq!(args.server, "127.0.0.1:7700");
        assert_eq!(args.cards, 10_000);
        assert_eq!(args.connections, 8);
        assert_eq!(args.duration, Duration::from_secs(10));
        assert_eq!(args.mix, Mix::parse(DEFAULT_MIX).expect("mix"));
        let args = Args::try_parse_from([
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
        assert!(Args::try_parse_from(["citycard-loadtest", "--mix", "bogus=1"]).is_err());
    }

    #[test]
    fn terminal_discovery_orders_by_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let terminals = dir.path().join("terminals");
        std::fs::create_dir(&terminals).expect("mkdir");
        for id in ["reader-10", "reader-2", "reader-1", "kiosk-1", "counter-1"] {
            std::fs::write(terminals.join(format!("{id}.pem")), "").expect("pem");
            std::fs::write(terminals.join(format!("{id}.key")), "").expect("key");
        }
        std::fs::write(terminals.join("reader-3.pem"), "").expect("pem without key");
        let readers = terminals_with_prefix(dir.path(), "reader").expect("list");
        assert_eq!(readers, vec!["reader-1", "reader-2", "reader-10"]);
    }
}
