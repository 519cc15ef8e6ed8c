//! Feeds arbitrary bytes to the frame splitter and the request and response decoders; every
//! message decoded must re-encode to exactly the bytes it came from. The checks live in
//! `../check.rs`, which `tests/fuzz_corpus.rs` also runs over the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../check.rs");

fuzz_target!(|data: &[u8]| check(data));
