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
use crate::{cards, cpu, plot, server};

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
    /// Second by second over the measured window.
    over_time: Vec<Sample>,
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
    let (readers, kiosks, counter) = if target.server_pid.is_some() && options.spawn {
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
        let t = Terminal { id: id.to_owned(), config: client::client_config(&target.keys, id)? };
        configs.insert(id.to_owned(), t.clone());
        Ok(t)
    };
    let counter = terminal(&counter)?;

    // Setup: issue the cards.
    let setup_started = Instant::now();
    println!("issuing {} cards through {} at {} ...", options.cards, counter.id, target.addr);
    let cards = cards::issue_cards(
        &target.addr,
        &counter,
        options.cards,
        options.deposit,
        now_ns(),
        options.timeout,
    )
    .await?;
    let setup_s = setup_started.elapsed().as_secs_f64();

    // Workers, each with its share of the cards.
    let plan = Arc::new(Plan {
        addr: target.addr.clone(),
        mix: options.mix.clone(),
        pipeline,
        worker_rate: options.rate.map(|r| r / n as f64),
        timeout: options.timeout,
        verify: options.verify,
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
    let server_pid = target.server_pid.clone();
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(timeline.measure_start).await;
        let before = (server_pid.as_deref().and_then(cpu::cpu_ticks), cpu::cpu_ticks("self"));
        tokio::time::sleep_until(timeline.deadline).await;
        let after = (server_pid.as_deref().and_then(cpu::cpu_ticks), cpu::cpu_ticks("self"));
        (before, after)
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
    let summary = report::summarize(
        &info,
        &stats,
        delta(server_before, server_after),
        delta(self_before, self_after),
    );
    let over_time = over_time.await.map_err(|e| anyhow!("latency sampler: {e}"))?;
    Ok(Outcome { summary, hist: stats.hist, over_time })
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

/// Carries out one run as the command line asked, prints the report and writes the files;
/// the exit status says whether it went clean (see `LONG_ABOUT`).
pub fn main(options: &Options) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("citycard-loadtest: error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let spawned = if options.spawn {
        let readers = options.connections;
        let kiosks = if options.mix.needs_kiosk() { options.connections } else { 1 };
        let started = server::server_binary(options.server_bin.as_deref()).and_then(|bin| {
            println!(
                "spawning {} serve (creating {} terminal certificates) ...",
                bin.display(),
                readers.saturating_sub(1) + kiosks.saturating_sub(1)
            );
            server::Spawned::start(&bin, readers, kiosks, &options.server_args)
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
        None => {
            Target { addr: options.server.clone(), keys: options.keys.clone(), server_pid: None }
        }
    };
    let result = runtime.block_on(run(options, &target));
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
