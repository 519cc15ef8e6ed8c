//! The report of a run: the text summary, the JSON summary (`--json`) and the HdrHistogram
//! percentile distribution (`--hgrm`).

use std::collections::BTreeMap;
use std::io::Write;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stats::{OpCounts, Stats};

/// The JSON summary (`--json`).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    // Configuration.
    pub mode: String,
    pub server: String,
    pub spawned: bool,
    /// Against the floor: the in-process echo server that decides nothing.
    pub floor: bool,
    pub server_args: Vec<String>,
    pub connections: usize,
    pub reader_connections: usize,
    pub kiosk_connections: usize,
    pub pipeline: usize,
    pub rate: Option<f64>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub timeout_s: f64,
    pub cards: usize,
    pub deposit: i64,
    pub mix: String,
    pub seed: u64,
    pub verify: bool,
    // Results.
    pub setup_s: f64,
    pub sent: u64,
    pub answered_in_window: u64,
    pub throughput_tps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub p9999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    pub latency_count: u64,
    pub approved: u64,
    pub declined: u64,
    pub declined_by_reason: BTreeMap<String, u64>,
    pub by_operation: BTreeMap<String, OpCounts>,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub bad_macs: u64,
    pub timeouts: u64,
    pub late_answers: u64,
    pub behind_schedule: u64,
    pub topups_skipped: u64,
    pub cards_taken_out: u64,
    pub verify_checked: u64,
    pub verify_unchecked: u64,
    pub verify_mismatches: u64,
    pub live_balance_mismatches: u64,
    pub mismatch_samples: Vec<String>,
    pub server_cpu_us_per_tx: Option<f64>,
    pub client_cpu_us_per_tx: Option<f64>,
    pub server_exit: Option<String>,
}

/// Configuration of a run, filled in by `main`.
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub mode: String,
    pub server: String,
    pub spawned: bool,
    pub floor: bool,
    pub server_args: Vec<String>,
    pub connections: usize,
    pub reader_connections: usize,
    pub kiosk_connections: usize,
    pub pipeline: usize,
    pub rate: Option<f64>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub timeout_s: f64,
    pub cards: usize,
    pub deposit: i64,
    pub mix: String,
    pub seed: u64,
    pub verify: bool,
    pub setup_s: f64,
}

pub fn summarize(
    info: &RunInfo,
    stats: &Stats,
    server_cpu_us: Option<f64>,
    client_cpu_us: Option<f64>,
) -> Summary {
    let h = &stats.hist;
    let q = |quantile: f64| if h.is_empty() { 0 } else { h.value_at_quantile(quantile) };
    let tps =
        if info.duration_s > 0.0 { stats.throughput_count as f64 / info.duration_s } else { 0.0 };
    let per_tx = |us: Option<f64>| {
        us.filter(|_| stats.throughput_count > 0).map(|us| us / stats.throughput_count as f64)
    };
    Summary {
        mode: info.mode.clone(),
        server: info.server.clone(),
        spawned: info.spawned,
        floor: info.floor,
        server_args: info.server_args.clone(),
        connections: info.connections,
        reader_connections: info.reader_connections,
        kiosk_connections: info.kiosk_connections,
        pipeline: info.pipeline,
        rate: info.rate,
        duration_s: info.duration_s,
        warmup_s: info.warmup_s,
        timeout_s: info.timeout_s,
        cards: info.cards,
        deposit: info.deposit,
        mix: info.mix.clone(),
        seed: info.seed,
        verify: info.verify,
        setup_s: info.setup_s,
        sent: stats.sent,
        answered_in_window: stats.throughput_count,
        throughput_tps: tps,
        p50_us: q(0.50),
        p90_us: q(0.90),
        p99_us: q(0.99),
        p999_us: q(0.999),
        p9999_us: q(0.9999),
        max_us: h.max(),
        mean_us: if h.is_empty() { 0.0 } else { h.mean() },
        latency_count: h.len(),
        approved: stats.approved,
        declined: stats.declined_count(),
        declined_by_reason: stats.declined.clone(),
        by_operation: stats.per_op.clone(),
        errors: stats.error_count(),
        errors_by_kind: stats.errors.clone(),
        bad_macs: stats.bad_macs,
        timeouts: stats.timeouts,
        late_answers: stats.late_answers,
        behind_schedule: stats.behind_schedule,
        topups_skipped: stats.topups_skipped,
        cards_taken_out: stats.dead_cards,
        verify_checked: stats.verify_checked,
        verify_unchecked: stats.verify_unchecked,
        verify_mismatches: stats.verify_mismatches + stats.live_mismatches,
        live_balance_mismatches: stats.live_mismatches,
        mismatch_samples: stats.mismatch_samples.clone(),
        server_cpu_us_per_tx: per_tx(server_cpu_us),
        client_cpu_us_per_tx: per_tx(client_cpu_us),
        server_exit: None,
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The human-readable report.
pub fn render_text(s: &Summary) -> String {
    let mut out = String::new();
    let rate = s.rate.map_or(String::new(), |r| format!(" at {r} tx/s"));
    out.push_str(&format!(
        "citycard-loadtest: {}{rate}, {} terminals ({} reader + {} kiosk connections), pipeline {}, {:.1} s measured after {:.1} s warm-up\n",
        s.mode, s.connections, s.reader_connections, s.kiosk_connections, s.pipeline, s.duration_s, s.warmup_s
    ));
    out.push_str(&format!(
        "  server {}{}, {} cards {}, mix {}, seed {}\n",
        s.server,
        if s.floor {
            " (floor: echo server in this process, decides nothing)"
        } else if s.spawned {
            " (spawned)"
        } else {
            ""
        },
        thousands(s.cards as u64),
        if s.floor {
            "made up by the tester (the floor keeps none)".to_owned()
        } else {
            format!("of {} issued in {:.2} s", s.deposit, s.setup_s)
        },
        s.mix,
        s.seed
    ));
    out.push_str(&format!(
        "throughput   {:.1} tx/s ({} answers in {:.2} s; {} requests sent)\n",
        s.throughput_tps,
        thousands(s.answered_in_window),
        s.duration_s,
        thousands(s.sent)
    ));
    out.push_str(&format!(
        "latency ms   p50 {}  p90 {}  p99 {}  p99.9 {}  p99.99 {}  max {}  (mean {:.3}, {} samples{})\n",
        ms(s.p50_us),
        ms(s.p90_us),
        ms(s.p99_us),
        ms(s.p999_us),
        ms(s.p9999_us),
        ms(s.max_us),
        s.mean_us / 1000.0,
        thousands(s.latency_count),
        if s.rate.is_some() { ", from intended send times" } else { "" }
    ));
    let reasons: Vec<String> =
        s.declined_by_reason.iter().map(|(k, v)| format!("{k} {}", thousands(*v))).collect();
    out.push_str(&format!(
        "answers      approved {}  declined {}{}\n",
        thousands(s.approved),
        thousands(s.declined),
        if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) }
    ));
    let ops: Vec<String> = s
        .by_operation
        .iter()
        .map(|(k, v)| format!("{k} {} ({} approved)", thousands(v.answered), thousands(v.approved)))
        .collect();
    out.push_str(&format!("by operation {}\n", ops.join(", ")));
    out.push_str(&format!(
        "errors       {}  timeouts {}  bad MACs {}  late answers {}\n",
        thousands(s.errors),
        thousands(s.timeouts),
        thousands(s.bad_macs),
        thousands(s.late_answers)
    ));
    for (k, v) in &s.errors_by_kind {
        out.push_str(&format!("  {k}: {}\n", thousands(*v)));
    }
    if s.behind_schedule > 0 {
        out.push_str(&format!(
            "open loop    {} scheduled requests never sent (the tester fell behind the rate)\n",
            thousands(s.behind_schedule)
        ));
    }
    if s.cards_taken_out > 0 {
        out.push_str(&format!(
            "cards        {} taken out of the load after an unknown outcome\n",
            thousands(s.cards_taken_out)
        ));
    }
    match (s.server_cpu_us_per_tx, s.client_cpu_us_per_tx) {
        (Some(server), client) => out.push_str(&format!(
            "cpu          server {server:.1} us/tx{}\n",
            client.map_or(String::new(), |c| format!(", load tester {c:.1} us/tx"))
        )),
        (None, Some(client)) => {
            out.push_str(&format!("cpu          load tester {client:.1} us/tx\n"))
        }
        (None, None) => {}
    }
    if s.verify {
        out.push_str(&format!(
            "verify       {} cards checked, {} mismatches ({} during the load), {} unchecked\n",
            thousands(s.verify_checked),
            thousands(s.verify_mismatches),
            thousands(s.live_balance_mismatches),
            thousands(s.verify_unchecked)
        ));
    }
    for m in &s.mismatch_samples {
        out.push_str(&format!("  MISMATCH {m}\n"));
    }
    if let Some(exit) = &s.server_exit {
        out.push_str(&format!("server       {exit}\n"));
    }
    out
}

/// Java HdrHistogram's `subBucketCount` for a number of significant digits.
fn sub_bucket_count(sigfig: u8) -> u64 {
    let largest = 2 * 10u64.pow(u32::from(sigfig));
    largest.next_power_of_two()
}

/// Writes the percentile distribution in HdrHistogram's text format
/// (`outputPercentileDistribution` with 5 ticks per half distance), values divided by
/// `scale` (1000.0: microseconds recorded, milliseconds written).
pub fn write_hgrm(h: &Histogram<u64>, scale: f64, out: &mut impl Write) -> std::io::Result<()> {
    let digits = usize::from(h.sigfig());
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / scale;
            let quantile = v.quantile_iterated_to();
            if quantile < 1.0 {
                writeln!(
                    out,
                    "{value:>12.digits$} {quantile:>2.12} {total:>10} {:>14.2}",
                    1.0 / (1.0 - quantile)
                )?;
            } else {
                writeln!(out, "{value:>12.digits$} {quantile:>2.12} {total:>10}")?;
            }
        }
    }
    let (mean, stdev) =
        if h.is_empty() { (0.0, 0.0) } else { (h.mean() / scale, h.stdev() / scale) };
    writeln!(out, "#[Mean    = {mean:>12.digits$}, StdDeviation   = {stdev:>12.digits$}]")?;
    writeln!(
        out,
        "#[Max     = {:>12.digits$}, Total count    = {:>12}]",
        h.max() as f64 / scale,
        h.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_histogram;

    #[test]
    fn hgrm_has_the_usual_shape() {
        let mut h = new_histogram().expect("histogram");
        for v in 1..=10_000u64 {
            h.record(v * 10).expect("record");
        }
        let mut out = Vec::new();
        write_hgrm(&h, 1000.0, &mut out).expect("write");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "       Value     Percentile TotalCount 1/(1-Percentile)");
        assert_eq!(lines[1], "");
        // First row: the smallest value at percentile 0.
        let first: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(first.len(), 4);
        assert_eq!(first[0], "0.010");
        assert!(first[1].starts_with("0.000000000000"));
        assert_eq!(first[3], "1.00");
        // Percentiles and counts never decrease; the last row is 100% without the 4th column.
        let rows: Vec<Vec<&str>> = lines[2..]
            .iter()
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert!(rows.len() > 20);
        let mut last = (0.0f64, 0u64);
        for row in &rows {
            let p: f64 = row[1].parse().expect("percentile");
            let c: u64 = row[2].parse().expect("count");
            assert!(p >= last.0 && c >= last.1);
            last = (p, c);
        }
        let end = rows.last().expect("rows");
        assert_eq!(end.len(), 3);
        assert_eq!(end[1], "1.000000000000");
        assert_eq!(end[2], "10000");
        let footer: Vec<&&str> = lines.iter().filter(|l| l.starts_with("#[")).collect();
        assert_eq!(footer.len(), 3);
        assert!(footer[0].starts_with("#[Mean    = ") && footer[0].contains("StdDeviation   = "));
        assert!(footer[1].contains("Total count    =        10000]"));
        assert!(footer[1].starts_with("#[Max     =      100."));
        assert!(footer[2].contains("SubBuckets     =         2048]"));
    }

    #[test]
    fn hgrm_of_an_empty_histogram_is_just_header_and_footer() {
        let h = new_histogram().expect("histogram");
        let mut out = Vec::new();
        write_hgrm(&h, 1000.0, &mut out).expect("write");
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(text.lines().count(), 5);
        assert!(text.contains("Total count    =            0]"));
    }

    #[test]
    fn thousands_separator() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
