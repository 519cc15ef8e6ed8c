//! The floor end to end: a short bounded run against the in-process echo server (real TLS with
//! fresh certificates from the citycard binary, built if missing), and the options it refuses.

use citycard_loadtest::options::Options;
use citycard_loadtest::run;
use clap::Parser;

fn options(extra: &[&str]) -> Options {
    let mut args = vec!["citycard-loadtest", "--no-progress", "--cards", "200", "--timeout", "5s"];
    args.extend_from_slice(extra);
    Options::try_parse_from(args).expect("options")
}

#[test]
fn a_short_floor_run_answers_everything_without_errors() {
    let outcome = run::execute(&options(&["--floor", "--connections", "2", "--duration", "1s"]))
        .expect("the floor run");
    let s = &outcome.summary;
    assert!(s.floor);
    assert_eq!(s.connections, 2);
    assert!(s.answered_in_window > 0, "no answers: {s:?}");
    assert_eq!(s.errors, 0, "{:?}", s.errors_by_kind);
    assert_eq!(s.timeouts, 0);
    assert_eq!(s.bad_macs, 0);
    assert_eq!(s.approved, s.latency_count);
    assert!(s.server_cpu_us_per_tx.is_some(), "the floor's threads were not measured");
    assert!(s.by_operation.contains_key("purchase"));
    assert!(outcome.over_time.iter().all(|sample| sample.tps >= 0.0));
    assert_eq!(s.server_exit.as_deref(), Some("floor server stopped"));
}

#[test]
fn the_floor_refuses_what_it_cannot_do() {
    let verify = run::execute(&options(&["--floor", "--verify", "--duration", "1s"]));
    let text = format!("{:#}", verify.err().expect("--floor --verify is refused"));
    assert!(text.contains("--verify"), "{text}");
    let both = run::execute(&options(&["--floor", "--spawn", "--duration", "1s"]));
    let text = format!("{:#}", both.err().expect("--floor --spawn is refused"));
    assert!(text.contains("exclude each other"), "{text}");
}
