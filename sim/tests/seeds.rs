//! CI's bounded simulator run: a fixed set of seeds must pass every invariant, and one seed run
//! twice must give the same trace. Long runs use the binary (`--seeds N`).

use citycard_sim::{run, Config};

/// Seeds and steps CI runs: well under a minute of debug build on two cores (12 seeds took
/// 15 s on 2026-12-03; each step is one batch of 1-8 commands with commits, faults and
/// crashes, and since 2026-12-04 the replication step with its quiet spells and failover
/// drills, so this is about 35,000 transactions, 290 crashes and 56 failover drills).
const SEEDS: u64 = 20;
const STEPS: u64 = 400;

#[test]
fn seeds_pass_every_invariant() {
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2u64)
            .map(|lane| {
                scope.spawn(move || {
                    (1..=SEEDS)
                        .filter(|seed| seed % 2 == lane)
                        .filter_map(|seed| run(Config { seed, steps: STEPS, inject: None }).err())
                        .map(|f| f.to_string())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec!["panic".into()]))
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn same_seed_same_trace() {
    let a = run(Config { seed: 77, steps: 150, inject: None });
    let b = run(Config { seed: 77, steps: 150, inject: None });
    let (a, b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!("seed 77 failed: {:?} {:?}", a.err(), b.err()),
    };
    assert_eq!(a.trace, b.trace, "the same seed must give the same trace");
    assert_eq!(a.transactions, b.transactions);
    let c = run(Config { seed: 78, steps: 150, inject: None }).map_err(|f| f.to_string());
    assert_ne!(c.map(|s| s.trace), Ok(a.trace), "another seed gives another trace");
}
