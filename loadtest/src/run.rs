//! One run from start to end: the server it runs against (given, spawned or the floor), the
//! terminals and cards, the workers started together, CPU sampled over the measured window,
//! the live progress line, and the report and files at the end.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::client::{self, Terminal};
use crate::mix::Rng;
use crate::options::Options;
use crate::report::{self, RunInfo, Summary};
use crate::stats::{Sample, Stats};
use crate::workload::{self, Live, Plan, Timeline, WorkerSpec};
use crate::{cards, cpu, floor, plot, server};

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Where the run happens: the server address and its keys.
struct Target {
    addr: String,
    keys: PathBuf,
    /// The terminals are reader-N and kiosk-N, made for this run (`--spawn`, `--floor`).
    fresh_keys: bool,
    /// The floor server: no cards to issue, no roles to check, no balances to verify.
    floor: bool,
    /// Whose CPU time is the server's.
    server_cpu: Option<cpu::Subject>,
}

/// The server a run goes against, held for as long as the run lasts.
enum Server {
    /// `--server`, started by someone else.
    Given,
    Spawned(server::Spawned),
    Floor(floor::Floor),
}

impl Server {
    /// Starts what the options ask for (`--spawn`, `--floor`, or nothing).
    fn start(options: &Options) -> anyhow::Result<Server> {
        if options.spawn && options.floor {
            bail!("--spawn and --floor exclude each other: one server per run");
        }
        if options.floor && options.mix.has_transit() {
            bail!("the floor server does not answer tapin, tapout, inquiry or reversal");
        }
        if options.floor && options.verify {
            bail!("--verify has nothing to check with --floor: the floor server keeps no balances");
        }
        if !options.spawn && !options.floor {
            return Ok(Server::Given);
        }
        let readers = options.connections.max(1);
        let kiosks = if options.mix.needs_kiosk() { readers } else { 1 };
        let bin = server::server_binary(options.server_bin.as_deref())?;
        let what = if options.floor { "keys for the floor server" } else { "serve" };
        println!(
            "{} {what} (creating {} terminal certificates) ...",
            bin.display(),
            readers.saturating_sub(1) + kiosks.saturating_sub(1)
        );
        if options.floor {
            let f = floor::Floor::start(&bin, readers, kiosks)?;
            println!("floor echo server listening on {} (in this process)", f.addr);
            Ok(Server::Floor(f))
        } else {
            let s = server::Spawned::start(&bin, readers, kiosks, &options.server_args)?;
            println!("server pid {} listening on {}", s.pid, s.addr);
            Ok(Server::Spawned(s))
        }
    }

    fn target(&self, options: &Options) -> Target {
        match self {
            Server::Given => Target {
                addr: options.server.clone(),
                keys: options.keys.clone(),
                fresh_keys: false,
                floor: false,
                server_cpu: None,
            },
            Server::Spawned(s) => Target {
                addr: s.addr.clone(),
                keys: s.keys.clone(),
                fresh_keys: true,
                floor: false,
                server_cpu: Some(cpu::Subject::Process(s.pid.to_string())),
            },
            Server::Floor(f) => Target {
                addr: f.addr.clone(),
                keys: f.keys.clone(),
                fresh_keys: true,
                floor: true,
                server_cpu: Some(cpu::Subject::Threads(floor::THREAD_NAME)),
            },
        }
    }

    /// Stops a server this run started: how it ended, and the problems its log shows.
    fn stop(self) -> (Option<String>, Vec<String>) {
        match self {
            Server::Given => (None, Vec::new()),
            Server::Spawned(s) => {
                let problems = s.log_problems(10);
                let exit = match s.stop(Duration::from_secs(20)) {
                    Ok(text) => text,
                    Err(e) => format!("stopping failed: {e:#}"),
                };
                (Some(exit), problems)
            }
            Server::Floor(f) => (Some(f.stop()), Vec::new()),
        }
    }
}

/// What a run found.
pub struct Outcome {
    pub summary: Summary,
    /// Latency of every measured request, microseconds.
    pub hist: Histogram<u64>,
    /// Second by second over the measured window.
    pub over_time: Vec<Sample>,
    /// WARN and ERROR lines of a spawned server's log.
    pub server_problems: Vec<String>,
}

/// Takes a [`Sample`] of the answers recorded in each second of the measured window (a part
/// second at the end when the window is not a whole number of seconds).
async fn sample_each_second(live: Arc<Live>, timeline: Timeline) -> Vec<Sample> {
    let take = |t_s: f64, seconds: f64| {
        // A short section without an await; the workers add to the window every 100 ms.
        live.window.lock().ok().map(|mut h| {
            let sample = Sample::of(&h, t_s, seconds);
            h.reset();
            sample
        })
    };
    tokio::time::sleep_until(timeline.measure_start).await;
    let _ = take(0.0, 0.0);
    let mut samples = Vec::new();
    let mut last = timeline.measure_start;
    loop {
        let next = (last + Duration::from_secs(1)).min(timeline.deadline);
        tokio::time::sleep_until(next).await;
        let t_s = (next - timeline.measure_start).as_secs_f64();
        samples.extend(take(t_s, (next - last).as_secs_f64()));
        last = next;
        if next >= timeline.deadline {
            return samples;
        }
    }
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

async fn run(options: &Options, target: &Target) -> anyhow::Result<Outcome> {
    if options.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if let Some(rate) = options.rate {
        if !(rate > 0.0 && rate.is_finite()) {
            bail!("--rate must be a positive number");
        }
    }
    let pipeline = options.pipeline.unwrap_or(if options.rate.is_some() { 64 } else { 1 });
    if pipeline == 0 {
        bail!("--pipeline must be at least 1");
    }
    if options.cards < options.connections {
        bail!(
            "--cards {} is fewer than --connections {}: every worker needs cards",
            options.cards,
            options.connections
        );
    }
    if options.cards < options.connections * pipeline {
        eprintln!(
            "note: {} cards for {} workers x pipeline {}: workers will wait for free cards",
            options.cards, options.connections, pipeline
        );
    }
    let needs_kiosk = options.mix.needs_kiosk();
    let n = options.connections;

    // Terminals.
    let (readers, kiosks, counter) = if target.fresh_keys {
        let readers: Vec<String> = (1..=n).map(|i| format!("reader-{i}")).collect();
        let kiosks: Vec<String> = (1..=n).map(|i| format!("kiosk-{i}")).collect();
        (readers, kiosks, "counter-1".to_owned())
    } else {
        let readers = client::terminals_with_prefix(&target.keys, "reader")?;
        let kiosks = client::terminals_with_prefix(&target.keys, "kiosk")?;
        let counters = client::terminals_with_prefix(&target.keys, "counter")?;
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
        let t = Terminal::load(&target.keys, id, &target.addr)?;
        configs.insert(id.to_owned(), t.clone());
        Ok(t)
    };
    let counter = terminal(&counter)?;

    // Setup: issue the cards (the floor keeps none: they are made up here).
    let setup_started = Instant::now();
    let cards = if target.floor {
        cards::made_up(options.cards, options.deposit, options.seed)
    } else {
        println!("issuing {} cards through {} at {} ...", options.cards, counter.id, target.addr);
        cards::issue_cards(&counter, options.cards, options.deposit, now_ns(), options.timeout)
            .await?
    };
    let setup_s = setup_started.elapsed().as_secs_f64();

    // Workers, each with its share of the cards.
    let plan = Arc::new(Plan {
        addr: target.addr.clone(),
        mix: options.mix.clone(),
        pipeline,
        worker_rate: options.rate.map(|r| r / n as f64),
        timeout: options.timeout,
        verify: options.verify,
        floor: target.floor,
    });
    let live = Arc::new(Live::new()?);
    let ready = Arc::new(tokio::sync::Barrier::new(n + 1));
    let (start_tx, start_rx) = tokio::sync::watch::channel(None::<Timeline>);
    let mut shares: Vec<Vec<cards::Card>> = (0..n).map(|_| Vec::new()).collect();
    for (i, card) in cards.into_iter().enumerate() {
        shares[i % n].push(card);
    }
    let mut seeder = Rng::new(options.seed);
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
        measure_start: start + options.warmup,
        deadline: start + options.warmup + options.duration,
    };
    let _ = start_tx.send(Some(timeline));
    let mode = if options.rate.is_some() { "open loop" } else { "closed loop" };
    println!(
        "{mode}: {n} workers ({} reader, {} kiosk connections; {} + {} distinct terminals), pipeline {pipeline}, {:?}{}",
        n,
        if needs_kiosk { n } else { 0 },
        reader_ids.len(),
        kiosk_ids.len(),
        options.duration,
        if options.warmup.is_zero() { String::new() } else { format!(" after {:?} warm-up", options.warmup) }
    );

    // Server and own CPU over the measured window.
    let server_cpu = target.server_cpu.clone();
    let cpu = tokio::spawn(async move {
        let me = cpu::Subject::Process("self".into());
        let read = || (server_cpu.as_ref().and_then(cpu::ticks), cpu::ticks(&me));
        tokio::time::sleep_until(timeline.measure_start).await;
        let before = read();
        tokio::time::sleep_until(timeline.deadline).await;
        (before, read())
    });

    let over_time = tokio::spawn(sample_each_second(live.clone(), timeline));

    // Live progress.
    let bar = progress_bar(std::io::stdout().is_terminal() && !options.no_progress);
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
                        let phase = if now < timeline.measure_start { "warm-up" } else if now < timeline.deadline { "load" } else if options.verify { "drain/verify" } else { "drain" };
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
    let tick_us = 1e6 / cpu::clock_ticks_per_second() as f64;
    let delta = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if b >= a => Some((b - a) as f64 * tick_us),
        _ => None,
    };
    let info = RunInfo {
        mode: mode.to_owned(),
        server: target.addr.clone(),
        spawned: options.spawn,
        floor: target.floor,
        server_args: options.server_args.clone(),
        connections: n,
        reader_connections: n,
        kiosk_connections: if needs_kiosk { n } else { 0 },
        pipeline,
        rate: options.rate,
        duration_s: options.duration.as_secs_f64(),
        warmup_s: options.warmup.as_secs_f64(),
        timeout_s: options.timeout.as_secs_f64(),
        cards: cards_back,
        deposit: options.deposit,
        mix: options.mix.to_string(),
        seed: options.seed,
        verify: options.verify,
        setup_s,
    };
    let server_us = delta(server_before, server_after);
    let mut client_us = delta(self_before, self_after);
    if target.floor {
        // The floor's threads are in this process: the load tester's own share is the rest.
        client_us = client_us.zip(server_us).map(|(all, floor)| (all - floor).max(0.0));
    }
    let summary = report::summarize(&info, &stats, server_us, client_us);
    let over_time = over_time.await.map_err(|e| anyhow!("latency sampler: {e}"))?;
    Ok(Outcome { summary, hist: stats.hist, over_time, server_problems: Vec::new() })
}

fn write_outputs(options: &Options, outcome: &Outcome) -> anyhow::Result<()> {
    let s = &outcome.summary;
    if let Some(path) = &options.json {
        let text = serde_json::to_string_pretty(s)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &options.hgrm {
        let mut out = Vec::new();
        report::write_hgrm(&outcome.hist, 1000.0, &mut out)?;
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &options.plot {
        let rate = s.rate.map_or(String::new(), |r| format!(" {r}/s"));
        let title = format!(
            "{}{rate}, {} conns, pipeline {}: {:.0} tx/s",
            s.mode, s.connections, s.pipeline, s.throughput_tps
        );
        plot::write_png(&outcome.hist, &outcome.over_time, &title, path)?;
    }
    Ok(())
}

/// Carries out one run as `options` ask: starts the server they name (if any), runs the load,
/// stops the server. Prints progress lines; the report is the caller's to print.
pub fn execute(options: &Options) -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let server = Server::start(options)?;
    let target = server.target(options);
    let result = runtime.block_on(run(options, &target));
    drop(runtime);
    let (server_exit, server_problems) = server.stop();
    match result {
        Ok(mut outcome) => {
            outcome.summary.server_exit = server_exit;
            outcome.server_problems = server_problems;
            Ok(outcome)
        }
        Err(e) => {
            let mut e = e;
            if let Some(exit) = server_exit {
                e = e.context(format!("server {exit}"));
            }
            for line in server_problems {
                e = e.context(format!("server log: {line}"));
            }
            Err(e)
        }
    }
}

/// The command line's run: [`execute`], the report, the files; the exit status says whether it
/// went clean (0), found errors, timeouts or mismatches (1), or could not be done (2).
pub fn main(options: &Options) -> ExitCode {
    let outcome = match execute(options) {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("citycard-loadtest: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report::render_text(&outcome.summary));
    for line in &outcome.server_problems {
        println!("server log: {line}");
    }
    if let Err(e) = write_outputs(options, &outcome) {
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
