//! Replays the committed `engine_ops` fuzz seed corpus (fuzz/corpus/engine_ops) plus a few
//! seeded random inputs through the same interpreter the fuzzer runs, so the engine invariants
//! are checked on every `cargo test` without libFuzzer or nightly. Bugs a fuzzer finds go to
//! `tests/regression.rs` as their smallest input with a `// postmortem:` line.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

include!("../fuzz/engine_ops.rs");

fn files(dir: &str) -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    // A missing directory is an error: a replay of nothing must not pass.
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let mut out: Vec<_> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    out.sort();
    out
}

#[test]
fn engine_ops_corpus_replays_clean() {
    let corpus = files("fuzz/corpus/engine_ops");
    assert!(!corpus.is_empty(), "the seed corpus is missing");
    let total: u64 = corpus.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    assert!(
        corpus.len() <= 32 && total <= 4096,
        "seed corpus grew: {} files, {total} bytes",
        corpus.len()
    );
    for path in &corpus {
        eprintln!("replaying {}", path.display());
        run_ops(&std::fs::read(path).unwrap());
    }
}

/// 24 seeded inputs in CI; `CITYCARD_FUZZ_ROUNDS=N` runs more (a long local run).
#[test]
fn engine_ops_seeded_random_inputs() {
    let rounds: usize =
        std::env::var("CITYCARD_FUZZ_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let mut state = std::env::var("CITYCARD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x0E16_1DE5_u64);
    for _ in 0..rounds {
        let input: Vec<u8> = (0..400)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) as u8
            })
            .collect();
        run_ops(&input);
    }
}
