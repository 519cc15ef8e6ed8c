//! Interprets the input as a sequence of engine operations on one shard (issue, signed and
//! forged card requests, offline records, staff operations, raw requests, commit, reopen) and
//! checks the money invariants after every step. The interpreter lives in `../engine_ops.rs`,
//! which `tests/fuzz_engine_corpus.rs` also runs over the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../engine_ops.rs");

fuzz_target!(|data: &[u8]| run_ops(data));
