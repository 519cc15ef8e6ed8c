//! The monitoring files in `deploy/` against the real exporter: `promtool check rules` and
//! `promtool test rules` on the alert rules, `promtool check metrics` on a live `/metrics` of a
//! spawned server, and every metric the dashboard and the rules name exists on that `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use citycard_protocol::Request;
use common::process::{self, body, http_get};
use common::Client;

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/citycard-rules.yml");
const RULES_TEST: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/citycard-rules.test.yml");
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/citycard.json");

fn run(promtool: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = process::promtool();
    let (ok, out) = run(&promtool, &["check", "rules", RULES], None);
    assert!(ok, "promtool check rules: {out}");
    assert!(out.contains("SUCCESS"), "{out}");
    let (ok, out) = run(&promtool, &["test", "rules", RULES_TEST], None);
    assert!(ok, "promtool test rules: {out}");
}

/// Every `citycard_*` name in `text` (expressions, legends and descriptions alike).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("citycard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_and_cover_the_dashboard_and_rules() {
    let promtool = process::promtool();
    let dir = tempfile::tempdir().unwrap();
    let server = process::spawn(dir.path(), &["--admin", "127.0.0.1:0"]);
    let keys = dir.path().join("keys");

    // Traffic, so that every family has samples: an approved issue and purchase, a decline,
    // and one malformed frame (a protocol error).
    let mut counter = Client::connect(&keys, server.addr, "counter-1").await;
    let mut reader = Client::connect(&keys, server.addr, "reader-1").await;
    let mut card = common::issue(&mut counter, 1, 1_000).await;
    let purchase = card.purchase(300, "reader-1");
    assert!(matches!(reader.call(&purchase).await, citycard_protocol::Response::Purchase(_)));
    let too_much = card.purchase(10_000, "reader-1");
    reader.call(&too_much).await;
    let _ = reader.call(&Request::Hello { client_time_ms: 0 }).await;
    let mut garbage = Client::connect(&keys, server.addr, "kiosk-1").await;
    garbage.send_raw(&[0xff; 32]).await.unwrap();
    let _ = garbage.recv().await;

    let (code, response) =
        tokio::task::spawn_blocking(move || http_get(server.admin, "/metrics")).await.unwrap();
    assert_eq!(code, 200, "{response}");
    let metrics = body(&response).to_owned();

    let (ok, out) = run(&promtool, &["check", "metrics"], Some(&metrics));
    assert!(ok && out.trim().is_empty(), "promtool check metrics: {out}\n{metrics}");

    // Every sample name on the page, and the families declared with # TYPE.
    let samples: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut referenced = metric_names(&std::fs::read_to_string(DASHBOARD).unwrap());
    assert!(referenced.len() >= 15, "dashboard names too few metrics: {referenced:?}");
    let from_rules = metric_names(&std::fs::read_to_string(RULES).unwrap());
    assert!(from_rules.len() >= 6, "rules name too few metrics: {from_rules:?}");
    referenced.extend(from_rules);
    // The replication series exist only with [replicate]; tests/replication.rs checks them
    // (and promtool on them) against a replicated server.
    let missing: Vec<&String> = referenced
        .iter()
        .filter(|name| {
            !name.starts_with("citycard_replication_")
                || *name == "citycard_replication_failures_total"
        })
        .filter(|name| !samples.contains(name.as_str()))
        .collect();
    assert!(missing.is_empty(), "named in deploy/ but not on /metrics: {missing:?}\n{metrics}");
    // The connected terminals' certificate expiry is there, labelled by terminal id.
    assert!(
        metrics.contains(
            "citycard_certificate_expiry_timestamp_seconds{kind=\"terminal\",terminal=\"reader-1\"}"
        ),
        "{metrics}"
    );

    counter.close().await;
    reader.close().await;
    assert!(server.stop().success());
}
