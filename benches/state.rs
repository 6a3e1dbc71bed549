//! The key-value state's map on its own: inserts and lookups per second on a
//! map of many keys, the work every write and read of a shard does after the
//! log. Keys look like redis-benchmark's (`key:000000012345`), drawn at
//! random from TIDEWAL_BENCH_KEYS (default 100000); 100-byte values.
//!
//! `cargo bench --bench state`. Figures are medians of 3 rounds of
//! TIDEWAL_BENCH_OPS (default 2000000) operations each. Memory: the
//! resident growth while the keys are first inserted, in key order, per key.

mod common;

use std::time::Instant;

use common::{env, median, rss_bytes};
use tidewal::state::{KvState, Op};

fn main() {
    let (space, ops) = (
        env("TIDEWAL_BENCH_KEYS", 100_000),
        env("TIDEWAL_BENCH_OPS", 2_000_000),
    );
    // A fixed linear congruential sequence: the same keys every run.
    let mut x: u64 = 12345;
    let keys: Vec<Vec<u8>> = (0..ops)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            format!("key:{:012}", (x >> 33) % space).into_bytes()
        })
        .collect();
    let value = vec![b'x'; 100];
    let mut state = KvState::new();
    let before = rss_bytes();
    for i in 0..space {
        let key = format!("key:{i:012}").into_bytes();
        state.apply_ops(
            0,
            &[Op::Put {
                key: &key,
                value: &value,
            }],
        );
    }
    let per_key = rss_bytes().saturating_sub(before) as f64 / space as f64;
    let (mut inserts, mut gets) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        for (i, key) in keys.iter().enumerate() {
            state.apply_ops(i as u64, &[Op::Put { key, value: &value }]);
        }
        inserts.push(t.elapsed().as_nanos() as f64 / ops as f64);
        let t = Instant::now();
        let found = keys.iter().filter(|k| state.get(k).is_some()).count();
        gets.push(t.elapsed().as_nanos() as f64 / ops as f64);
        assert_eq!(found as u64, ops);
    }
    println!(
        "KvState, {} keys, 100-byte values: insert {:.0} ns, get {:.0} ns (median of 3 rounds of {ops}); {per_key:.0} resident bytes per key",
        state.len(),
        median(inserts),
        median(gets)
    );
}
