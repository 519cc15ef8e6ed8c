//! Decisions as pure functions of the facts the shard gathers (card record, chain lookups,
//! limits, `now_ms`): no I/O, no clock, so each rule has a table test.

pub mod transit;
