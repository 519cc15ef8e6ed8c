//! Replays the committed fuzz corpus (`fuzz/corpus/decode_frame/`) through the same checks as
//! the `decode_frame` fuzz target (`fuzz/check.rs`), so `cargo test` covers it without
//! cargo-fuzz. Also keeps the committed corpus small: libFuzzer's generated inputs belong in a
//! directory outside the repository, never here.
#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use citycard_protocol::{decode_request, decode_response};

include!("../fuzz/check.rs");

// Committed seeds, by name prefix:
// - `req-*`: one valid request frame;
// - `resp-*`: one valid response frame;
// - `bad-*`: a malformed frame the request decoder rejects;
// - `crash-*`: regression inputs of fixed fuzzer findings (must simply pass `check`).

/// Guards against committing libFuzzer's generated corpus by mistake.
const MAX_FILES: usize = 32;
const MAX_TOTAL_BYTES: u64 = 4096;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/decode_frame");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_passes_the_fuzz_checks() {
    let files = corpus();
    assert!(files.len() >= 10, "corpus too small: {}", files.len());
    for (name, data) in &files {
        check(data);
        let mut buf = BytesMut::from(&data[..]);
        if name.starts_with("req-") {
            assert!(decode_request(&mut buf).unwrap().is_some(), "{name}");
            assert!(buf.is_empty(), "{name}: one frame");
        } else if name.starts_with("resp-") {
            assert!(decode_response(&mut buf).unwrap().is_some(), "{name}");
            assert!(buf.is_empty(), "{name}: one frame");
        } else if name.starts_with("bad-") {
            assert!(decode_request(&mut buf).is_err(), "{name}");
        } else {
            assert!(name.starts_with("crash-"), "unexpected corpus file {name}");
        }
    }
}

#[test]
fn corpus_has_a_seed_for_every_request_type() {
    let mut seen = std::collections::BTreeSet::new();
    for (name, data) in corpus() {
        if name.starts_with("req-") {
            seen.insert(data[3]);
        }
    }
    let expected: std::collections::BTreeSet<u8> = (0x01..=0x0d).collect();
    assert_eq!(seen, expected);
}

#[test]
fn committed_corpus_stays_small() {
    let files = corpus();
    let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    assert!(
        files.len() <= MAX_FILES,
        "{} corpus files: generated inputs were committed?",
        files.len()
    );
    assert!(total <= MAX_TOTAL_BYTES, "corpus is {total} bytes: generated inputs were committed?");
}
