//! A fast, unkeyed hasher for maps whose integer keys no peer can choose freely or whose size is
//! bounded, where std's SipHash (keyed against flooding) costs more than the lookup it serves.
//!
//! Use it only where a peer cannot make many keys collide to slow the server down: keys the
//! server assigns (journal positions), or a map bounded by a small limit (requests in flight on
//! one connection), where even every key in one bucket costs at most that limit per lookup.
//! Maps keyed by what a peer sends without such a bound keep SipHash.

use std::hash::{BuildHasherDefault, Hasher};

/// The multiply-rotate mix of rustc's FxHasher: one multiplication per word written. hashbrown
/// takes its bucket from the low bits and its tag from the top 7, so [`Hasher::finish`] folds
/// the high half in.
#[derive(Clone, Copy, Debug, Default)]
pub struct IntHasher(u64);

/// An odd constant with its bits well spread (from FxHasher).
const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl IntHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for IntHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

/// `HashMap<K, V, BuildIntHasher>`: see the module docs for where it may be used.
pub type BuildIntHasher = BuildHasherDefault<IntHasher>;

/// A `HashMap` with [`IntHasher`].
pub type IntMap<K, V> = std::collections::HashMap<K, V, BuildIntHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(value: T) -> u64 {
        BuildIntHasher::default().hash_one(value)
    }

    #[test]
    fn neighbouring_keys_spread_over_buckets_and_tags() {
        // Journal positions advance by a record's size (a multiple of 8) within one segment:
        // 4,096 of them must fall into most of 4,096 buckets and use many of the 128 tags.
        let mut buckets = std::collections::HashSet::new();
        let mut tags = std::collections::HashSet::new();
        for i in 0..4096u32 {
            let h = hash((1u64, 32 + i * 136));
            buckets.insert(h & 4095);
            tags.insert(h >> 57);
        }
        assert!(buckets.len() > 2500, "{} buckets", buckets.len());
        assert!(tags.len() > 100, "{} tags", tags.len());
        assert_ne!(hash(1u32), hash(2u32));
    }
}
