//! Snapshots of a shard: taken while writes go on, restart from them, and
//! what happens when they are damaged, on the fault backend and on disk.

#[macro_use]
mod common;

use std::rc::Rc;

use common::*;
use tidewal::engine::{CommitLevel, EngineError, Shard};
use tidewal::format::{parse_snapshot_file_name, snapshot_file_name};

async fn open<B: Backend>(b: &B) -> Result<Shard<B::S>, EngineError> {
    Shard::open(b.storage().await, small_options()).await
}

fn snapshots<B: Backend>(b: &B) -> Vec<String> {
    let mut v: Vec<String> = b
        .names()
        .into_iter()
        .filter(|n| parse_snapshot_file_name(n).is_some())
        .collect();
    v.sort();
    v
}

/// 400 keys over several WAL segments, snapshots after the 251st and the
/// 351st write (so the first segment is released), then 49 more writes.
async fn build<B: Backend>(b: &B) -> Vec<(String, String)> {
    let shard = open(b).await.unwrap();
    let mut want = Vec::new();
    for i in 0..400 {
        let (k, v) = (
            format!("key{i:04}"),
            format!("value-{i}-{}", "x".repeat(200 + i % 50)),
        );
        shard
            .put(k.as_bytes(), v.as_bytes(), CommitLevel::Local)
            .await
            .unwrap();
        want.push((k, v));
        if i == 250 || i == 350 {
            shard.snapshot().await.unwrap();
        }
    }
    shard.close().await.unwrap();
    want
}

fn contents<S: tidewal::Storage + Clone>(shard: &Shard<S>) -> Vec<(String, String)> {
    shard
        .scan(b"", None, usize::MAX)
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8(k.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            )
        })
        .collect()
}

async fn restart_from_newest<B: Backend>(b: B) {
    let want = build(&b).await;
    assert_eq!(snapshots(&b).len(), 2);
    let shard = open(&b).await.unwrap();
    let newest = snapshots(&b).pop().unwrap();
    assert_eq!(
        shard.open_report().snapshot.as_deref(),
        Some(newest.as_str())
    );
    assert!(shard.open_report().skipped_snapshots.is_empty());
    assert_eq!(
        shard.open_report().replayed,
        49,
        "only what follows the snapshot is replayed"
    );
    assert!(
        shard.wal().first_position().lsn > 0,
        "the WAL below the older snapshot was released"
    );
    assert_eq!(contents(&shard), want);
}

async fn corrupt_newest_falls_back<B: Backend>(b: B) {
    let want = build(&b).await;
    let newest = snapshots(&b).pop().unwrap();
    b.flip(&newest, 4096 + 100, 3); // inside the first data block
    let shard = open(&b).await.unwrap();
    let report = shard.open_report().clone();
    assert_eq!(report.skipped_snapshots.len(), 1);
    assert_eq!(report.skipped_snapshots[0].0, newest);
    assert!(
        report.skipped_snapshots[0].1.contains("block 0"),
        "{:?}",
        report.skipped_snapshots
    );
    assert_eq!(report.snapshot.as_deref(), Some(snapshots(&b)[0].as_str()));
    assert_eq!(
        contents(&shard),
        want,
        "older snapshot + WAL replay rebuild everything"
    );
}

async fn no_good_snapshot_and_released_wal_is_refused<B: Backend>(b: B) {
    build(&b).await;
    for name in snapshots(&b) {
        b.flip(&name, 10, 0); // the header
    }
    match open(&b).await {
        Err(EngineError::NoBaseForLog { first_lsn }) => assert!(first_lsn > 0),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("opened with a partial state"),
    }
}

async fn one_snapshot_keeps_the_wal<B: Backend>(b: B) {
    let shard = open(&b).await.unwrap();
    for i in 0..400 {
        let v = "y".repeat(250);
        shard
            .put(format!("k{i}").as_bytes(), v.as_bytes(), CommitLevel::Local)
            .await
            .unwrap();
    }
    shard.snapshot().await.unwrap();
    assert!(shard.wal().segment_count() > 1);
    assert_eq!(
        shard.wal().first_position().lsn,
        0,
        "a single snapshot is no base to release the WAL on"
    );
    shard.close().await.unwrap();
    // Even with that snapshot damaged, the WAL alone rebuilds everything.
    let only = snapshots(&b).pop().unwrap();
    b.flip(&only, 10, 0);
    let shard = open(&b).await.unwrap();
    assert_eq!(shard.len(), 400);
    assert!(shard.open_report().snapshot.is_none());
    assert!(
        b.names().contains(&format!("{only}.bad")),
        "the damaged snapshot is set aside"
    );
    shard.close().await.unwrap();
}

async fn snapshot_while_writing<B: Backend>(b: B) {
    let shard = Rc::new(open(&b).await.unwrap());
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                for i in 0..200 {
                    let k = format!("w{w}-{i:03}");
                    shard
                        .put(k.as_bytes(), b"v", CommitLevel::Local)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let pos = {
        glommio::yield_if_needed().await;
        shard.snapshot().await.unwrap()
    };
    for w in writers {
        w.await;
    }
    let expected_len = shard.len();
    let shard = Rc::try_unwrap(shard).ok().unwrap();
    shard.close().await.unwrap();
    assert!(snapshots(&b).contains(&snapshot_file_name(pos.lsn)));
    let shard = open(&b).await.unwrap();
    assert_eq!(shard.len(), expected_len);
    assert_eq!(shard.len(), 8 * 200);
}

both_backends!(
    restart_from_newest,
    corrupt_newest_falls_back,
    no_good_snapshot_and_released_wal_is_refused,
    one_snapshot_keeps_the_wal,
    snapshot_while_writing
);
