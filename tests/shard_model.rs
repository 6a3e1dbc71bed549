//! Model-based test of a shard: random puts, deletes, batches, gets and
//! scans, interleaved with crashes (a power cut that drops or tears unsynced
//! writes) and restarts, checked after every step against a `BTreeMap`:
//! every acknowledged write is there, nothing else is (but the one write in
//! flight at the crash, which may or may not have reached the disk), and
//! scans are ordered and complete.
//!
//! `TIDEWAL_SHARD_RUNS=N` sets the number of runs (default 60).

mod common;

use std::collections::BTreeMap;

use common::*;
use tidewal::FaultStorage;
use tidewal::engine::{CommitLevel, Shard};
use tidewal::state::Op;

type Model = BTreeMap<Vec<u8>, Vec<u8>>;
/// One write: keys with their new value, or `None` for a delete.
type Write = Vec<(Vec<u8>, Option<Vec<u8>>)>;

fn key(rng: &mut Rng) -> Vec<u8> {
    format!("k{:03}", rng.below(60)).into_bytes()
}

fn value(rng: &mut Rng) -> Vec<u8> {
    let len = rng.below(300) as usize;
    (0..len)
        .map(|i| b'a' + ((i as u64 + rng.0) % 26) as u8)
        .collect()
}

/// Random operations of one write: one put or delete, or a batch.
fn ops(rng: &mut Rng) -> Write {
    let n = if rng.below(4) == 0 {
        1 + rng.below(5)
    } else {
        1
    };
    (0..n)
        .map(|_| {
            let k = key(rng);
            let v = (rng.below(4) != 0).then(|| value(rng));
            (k, v)
        })
        .collect()
}

fn apply(model: &mut Model, ops: &[(Vec<u8>, Option<Vec<u8>>)]) {
    for (k, v) in ops {
        match v {
            Some(v) => model.insert(k.clone(), v.clone()),
            None => model.remove(k),
        };
    }
}

fn contents(shard: &Shard<FaultStorage>) -> Model {
    shard
        .scan(b"", None, usize::MAX)
        .into_iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

async fn one_run(seed: u64, stats: &mut BTreeMap<&'static str, u64>) {
    let mut rng = Rng(seed);
    let storage = FaultStorage::new();
    let options = small_options();
    let mut shard = Shard::open(storage.clone(), options.clone()).await.unwrap();
    let mut model = Model::new();
    let mut crashing = false;
    let mut uncertain: Option<Write> = None;
    for step in 0..400 {
        match rng.below(13) {
            12 => match shard.snapshot().await {
                Ok(_) => *stats.entry("snapshots").or_default() += 1,
                Err(e) => assert!(
                    crashing,
                    "seed {seed} step {step}: snapshot failed with no crash: {e}"
                ),
            },
            0..=8 => {
                let write = ops(&mut rng);
                let borrowed: Vec<Op<'_>> = write
                    .iter()
                    .map(|(k, v)| match v {
                        Some(v) => Op::Put { key: k, value: v },
                        None => Op::Delete { key: k },
                    })
                    .collect();
                match shard.write(&borrowed, CommitLevel::Local).await {
                    Ok(_) => {
                        *stats.entry("acked writes").or_default() += 1;
                        apply(&mut model, &write);
                        assert_eq!(contents(&shard), model, "seed {seed} step {step}");
                    }
                    Err(e) => {
                        assert!(
                            crashing,
                            "seed {seed} step {step}: a write failed with no crash: {e}"
                        );
                        uncertain.get_or_insert(write);
                    }
                }
            }
            // A shard whose WAL failed holds staged writes whose outcome is
            // unknown; it must be reopened before its reads mean anything.
            9 if uncertain.is_none() => {
                let (a, b) = (key(&mut rng), key(&mut rng));
                let (start, end) = if a <= b { (a, b) } else { (b, a) };
                let limit = 1 + rng.below(20) as usize;
                let want: Vec<_> = model
                    .range(start.clone()..end.clone())
                    .take(limit)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let got: Vec<_> = shard
                    .scan(&start, Some(&end), limit)
                    .into_iter()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect();
                assert_eq!(got, want, "seed {seed} step {step}: scan");
            }
            10 if !crashing => {
                storage.crash_after(rng.below(30));
                crashing = true;
            }
            _ => {
                // Restart: a clean close, or after a crash a power cut.
                if crashing {
                    drop(shard);
                    storage.power_cut(rng.power_cut());
                    *stats.entry("restarts after a crash").or_default() += 1;
                } else {
                    shard.close().await.unwrap();
                }
                shard = Shard::open(storage.clone(), options.clone())
                    .await
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: reopen: {e}"));
                if shard.open_report().snapshot.is_some() {
                    *stats.entry("opened from a snapshot").or_default() += 1;
                }
                let recovered = contents(&shard);
                if recovered != model {
                    let mut with_last = model.clone();
                    apply(&mut with_last, uncertain.as_deref().unwrap_or_default());
                    assert_eq!(
                        recovered, with_last,
                        "seed {seed} step {step}: recovered state"
                    );
                    model = with_last;
                    *stats.entry("in-flight write survived").or_default() += 1;
                }
                crashing = false;
                uncertain = None;
            }
        }
    }
    shard.close().await.ok();
}

#[test]
fn shard_matches_model_across_crashes() {
    let runs = runs("SHARD_RUNS", 60);
    run(move || async move {
        let mut stats = BTreeMap::new();
        for i in 0..runs {
            one_run(0x5eed_0000 + i, &mut stats).await;
        }
        eprintln!("{runs} shard runs: {stats:?}");
        if runs >= 20 {
            for what in [
                "restarts after a crash",
                "in-flight write survived",
                "acked writes",
                "snapshots",
                "opened from a snapshot",
            ] {
                assert!(
                    stats.get(what).copied().unwrap_or(0) > 0,
                    "no run reached: {what}"
                );
            }
        }
    });
}
