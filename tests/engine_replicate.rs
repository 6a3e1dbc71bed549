//! One engine's shards fed another engine's logs, record bytes as on disk
//! (what replication will carry): the copy converges to the same `(lsn,
//! chain)` per shard and the same data, keeps it across a restart, and
//! refuses a batch that does not continue its log.

mod common;

use bytes::Bytes;
use common::{disk_dir, quarantined};
use tidewal::engine::{CommitLevel, Engine, Options, block_on};
use tidewal::format::Expect;

fn options() -> Options {
    Options::new()
        .with_shard_count(4)
        .with_executor_count(2)
        .with_segment_bytes(256 << 10)
}

/// Copies every durable record of `from` that `to` lacks, shard by shard,
/// in batches of about `batch` bytes.
fn catch_up(from: &Engine, to: &Engine, batch: usize) {
    for stats in block_on(to.stats()).unwrap() {
        let mut pos = Expect {
            lsn: stats.next_lsn,
            chain: stats.chain,
            epoch: stats.epoch,
        };
        loop {
            let read = block_on(from.read_log(stats.shard, pos, batch)).unwrap();
            if read.records.is_empty() {
                break;
            }
            let bytes: Vec<u8> = read
                .records
                .iter()
                .flat_map(|r| r.encoded.iter().copied())
                .collect();
            block_on(to.replicate_at(stats.shard, Bytes::from(bytes), CommitLevel::Local))
                .unwrap()
                .expect("records staged");
            pos = read.next;
        }
    }
}

/// Asserts that `replica` holds `primary`'s logs (`(lsn, chain)` per shard)
/// and the same data; returns the primary's stats.
fn assert_same(primary: &Engine, replica: &Engine) -> Vec<tidewal::engine::ShardStats> {
    let (p, r) = (
        block_on(primary.stats()).unwrap(),
        block_on(replica.stats()).unwrap(),
    );
    for (p, r) in p.iter().zip(&r) {
        assert_eq!(
            (p.next_lsn, p.chain),
            (r.next_lsn, r.chain),
            "shard {}",
            p.shard
        );
        assert_eq!(p.keys, r.keys);
    }
    let all = |e: &Engine| block_on(e.scan("", None, usize::MAX)).unwrap();
    assert_eq!(all(replica), all(primary));
    p
}

#[test]
fn a_replica_engine_converges_and_restarts_the_same() {
    let (pdir, rdir) = (disk_dir(), disk_dir());
    let primary = Engine::open(pdir.path(), options()).unwrap();
    let replica = Engine::open(rdir.path(), options()).unwrap();
    for i in 0..2000u32 {
        let key = format!("k{:05}", i % 700);
        if i % 9 == 0 {
            block_on(primary.delete(key)).unwrap();
        } else {
            block_on(primary.put(key, format!("v{i}"))).unwrap();
        }
        if i == 900 {
            // Part of the way, in small batches, then the rest in large.
            catch_up(&primary, &replica, 4096);
        }
    }
    catch_up(&primary, &replica, 1 << 20);
    let p = assert_same(&primary, &replica);
    let all = |e: &Engine| block_on(e.scan("", None, usize::MAX)).unwrap();

    // A batch that does not continue the log (shard 0's first records
    // again) is refused and changes nothing.
    let first = block_on(primary.read_log(
        0,
        Expect {
            lsn: 0,
            chain: 0,
            epoch: 0,
        },
        4096,
    ))
    .unwrap();
    let stale: Vec<u8> = first.records[0].encoded.to_vec();
    assert!(block_on(replica.replicate_at(0, Bytes::from(stale), CommitLevel::Local)).is_err());
    assert_eq!(
        block_on(replica.stats()).unwrap()[0].next_lsn,
        p[0].next_lsn
    );

    block_on(replica.close()).unwrap();
    let replica = Engine::open(rdir.path(), options()).unwrap();
    assert_eq!(all(&replica), all(&primary), "after a restart");
    block_on(replica.close()).unwrap();
    block_on(primary.close()).unwrap();
}

fn one_shard() -> Options {
    Options::new()
        .with_shard_count(1)
        .with_executor_count(1)
        .with_segment_bytes(256 << 10)
}

#[test]
fn a_shard_rewinds_to_a_record_boundary_and_keeps_the_suffix_aside() {
    let dir = disk_dir();
    let engine = Engine::open(dir.path(), one_shard()).unwrap();
    let value = "v".repeat(200);
    for i in 0..1000 {
        block_on(engine.put(format!("a{i:04}"), value.clone())).unwrap();
    }
    block_on(engine.snapshot()).unwrap();
    for i in 0..500 {
        block_on(engine.put(format!("b{i:04}"), value.clone())).unwrap();
    }
    let at = block_on(engine.stats()).unwrap()[0].clone();
    // The suffix: several segments' worth, overwrites and deletes of keys
    // from before the cut, and a snapshot taken inside it.
    for i in 0..3000 {
        block_on(engine.put(format!("a{:04}", i % 1000), "c".repeat(200))).unwrap();
        if i % 3 == 0 {
            block_on(engine.delete(format!("b{:04}", i % 500))).unwrap();
        }
        if i == 1500 {
            block_on(engine.snapshot()).unwrap();
        }
    }
    let before = block_on(engine.stats()).unwrap()[0].clone();
    assert!(before.segments >= 3, "{} segments", before.segments);

    // Not a record boundary: refused, nothing changed.
    assert!(block_on(engine.rewind(0, at.next_lsn + 1)).is_err());
    let same = block_on(engine.stats()).unwrap()[0].clone();
    assert_eq!((same.next_lsn, same.chain), (before.next_lsn, before.chain));
    assert!(quarantined(dir.path()).is_empty());

    let pos = block_on(engine.rewind(0, at.next_lsn)).unwrap();
    assert_eq!((pos.lsn, pos.chain), (at.next_lsn, at.chain));
    let check = |engine: &Engine| {
        let s = block_on(engine.stats()).unwrap()[0].clone();
        assert_eq!((s.next_lsn, s.chain, s.keys), (at.next_lsn, at.chain, 1500));
        assert_eq!(
            block_on(engine.get("a0007")).unwrap().as_deref(),
            Some(value.as_bytes()),
            "the state is the one at the cut"
        );
        assert!(block_on(engine.get("b0000")).unwrap().is_some());
    };
    check(&engine);
    // What was cut is kept: the segments past the cut (and a copy of the
    // one holding it), the snapshot taken past it, and a note.
    let kept = quarantined(dir.path());
    assert!(kept.iter().any(|f| f.ends_with("REWIND.txt")), "{kept:?}");
    assert!(
        kept.iter().filter(|f| f.ends_with(".wal")).count() >= 2,
        "{kept:?}"
    );
    assert_eq!(
        kept.iter().filter(|f| f.ends_with(".snap")).count(),
        1,
        "{kept:?}"
    );
    // ... as a log `tidewal wal inspect` reads, intact, past the cut.
    let quarantine = std::fs::read_dir(dir.path().join("shard-0000"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("quarantine-"))
        .unwrap()
        .path();
    let out = common::wal_inspect(&quarantine, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&before.next_lsn.to_string()), "{text}");

    // The rewound log restarts the same and takes new records.
    block_on(engine.close()).unwrap();
    let engine = Engine::open(dir.path(), one_shard()).unwrap();
    check(&engine);
    block_on(engine.put("after", "rewind")).unwrap();
    block_on(engine.close()).unwrap();
    let engine = Engine::open(dir.path(), one_shard()).unwrap();
    assert_eq!(
        block_on(engine.get("after")).unwrap().as_deref(),
        Some(&b"rewind"[..])
    );
    block_on(engine.close()).unwrap();
}

#[test]
fn a_rewind_without_a_base_to_rebuild_from_is_refused_and_changes_nothing() {
    let dir = disk_dir();
    let engine = Engine::open(dir.path(), one_shard()).unwrap();
    let value = "v".repeat(200);
    block_on(engine.put("first", "1")).unwrap();
    let at = block_on(engine.stats()).unwrap()[0].clone();
    // Two snapshots past the cut release the log below the older one: no
    // snapshot at or below the cut, and the log no longer starts at 0.
    for round in 0..2 {
        for i in 0..2000 {
            block_on(engine.put(format!("k{i:04}"), value.clone())).unwrap();
        }
        block_on(engine.snapshot()).unwrap();
        let s = block_on(engine.stats()).unwrap()[0].clone();
        assert!(round == 0 || s.first_lsn > at.next_lsn, "{}", s.first_lsn);
    }
    let before = block_on(engine.stats()).unwrap()[0].clone();
    let refused = block_on(engine.rewind(0, at.next_lsn)).unwrap_err();
    assert!(
        refused.to_string().contains("snapshot re-sync"),
        "{refused}"
    );
    let after = block_on(engine.stats()).unwrap()[0].clone();
    assert_eq!(
        (after.next_lsn, after.chain, after.keys),
        (before.next_lsn, before.chain, before.keys)
    );
    assert!(quarantined(dir.path()).is_empty());
    block_on(engine.close()).unwrap();
}

/// A replica snapshots on its own schedule (retention), between batches of
/// its upstream's records: the snapshot must not add a record of its own,
/// or the next batch no longer continues its log (found by a catch-up of
/// 1.2 GB in `bench replication`, where the replica's retention snapshot
/// made it refuse the stream as diverged).
#[test]
fn a_replica_that_snapshots_between_batches_still_continues_its_upstream() {
    let (pdir, rdir) = (disk_dir(), disk_dir());
    let primary = Engine::open(pdir.path(), options()).unwrap();
    let replica = Engine::open(rdir.path(), options()).unwrap();
    for round in 0..3 {
        for i in 0..300u32 {
            block_on(primary.put(format!("k{i:04}"), format!("v{round}-{i}"))).unwrap();
        }
        catch_up(&primary, &replica, 8192);
        block_on(replica.snapshot()).unwrap();
    }
    catch_up(&primary, &replica, 8192);
    assert_same(&primary, &replica);
    block_on(replica.close()).unwrap();
    block_on(primary.close()).unwrap();
}

/// An epoch, once a shard's log has held it, is never started again, even
/// after a rewind (or a snapshot re-sync) took its records away: a node
/// promoted later must not carry the number of a history it dropped, which
/// another node may still hold.
#[test]
fn an_epoch_cut_away_by_a_rewind_is_never_begun_again() {
    let dir = disk_dir();
    let engine = Engine::open(dir.path(), one_shard()).unwrap();
    for i in 0..100 {
        block_on(engine.put(format!("a{i:04}"), "before")).unwrap();
    }
    let at = block_on(engine.stats()).unwrap()[0].clone();
    let dropped = block_on(engine.begin_epoch()).unwrap();
    assert!(dropped > at.epoch);
    for i in 0..100 {
        block_on(engine.put(format!("b{i:04}"), "after")).unwrap();
    }
    block_on(engine.rewind(0, at.next_lsn)).unwrap();
    let s = block_on(engine.stats()).unwrap()[0].clone();
    assert_eq!(s.epoch, at.epoch, "the log holds only the older epoch now");
    assert_eq!(
        s.epoch_floor, dropped,
        "the dropped epoch is kept as the floor"
    );
    // Across a restart, too.
    block_on(engine.close()).unwrap();
    let engine = Engine::open(dir.path(), one_shard()).unwrap();
    assert_eq!(block_on(engine.stats()).unwrap()[0].epoch_floor, dropped);
    let next = block_on(engine.begin_epoch()).unwrap();
    assert!(
        next > dropped,
        "epoch {next} begun again after {dropped} was cut away"
    );
    block_on(engine.close()).unwrap();
}

/// A replica that has seen its upstream in an epoch keeps it, durably,
/// even when no record of that epoch has reached its log: promoted, it
/// begins above it.
#[test]
fn an_epoch_seen_without_its_records_is_never_begun_again() {
    let dir = disk_dir();
    let engine = Engine::open(dir.path(), one_shard()).unwrap();
    block_on(engine.put("k", "v")).unwrap();
    let at = block_on(engine.stats()).unwrap()[0].clone();
    let seen = at.epoch + 5;
    block_on(engine.raise_epoch_floor(0, seen)).unwrap();
    // Lower is a no-op: the floor only rises.
    block_on(engine.raise_epoch_floor(0, seen - 1)).unwrap();
    let s = block_on(engine.stats()).unwrap()[0].clone();
    assert_eq!((s.epoch, s.epoch_floor), (at.epoch, seen));
    block_on(engine.close()).unwrap();
    let engine = Engine::open(dir.path(), one_shard()).unwrap();
    assert_eq!(block_on(engine.stats()).unwrap()[0].epoch_floor, seen);
    assert_eq!(block_on(engine.begin_epoch()).unwrap(), seen + 1);
    block_on(engine.close()).unwrap();
    let floors: Vec<_> = std::fs::read_dir(dir.path().join("shard-0000"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("epoch-floor-"))
        .collect();
    assert_eq!(floors.len(), 1, "older floor files are removed");
    // The epoch it began is kept as its own, so that a restart as a
    // replica never cuts its records as ones an upstream would send again.
    let begun: Vec<_> = std::fs::read_dir(dir.path().join("shard-0000"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("epoch-begun-"))
        .collect();
    assert_eq!(begun, [format!("epoch-begun-{:020}", seen + 1)]);
}

/// A node promoted (it began an epoch) and reopened as a replica
/// (`tail_refetchable`): damage among the records of its own epoch is
/// refused, not cut as if an upstream held them.
#[test]
fn damage_among_records_of_its_own_epoch_is_refused_in_a_replicas_log() {
    let dir = disk_dir();
    let engine = Engine::open(dir.path(), one_shard()).unwrap();
    block_on(engine.begin_epoch()).unwrap();
    for i in 0..200 {
        block_on(engine.put(format!("k{i:04}"), "o".repeat(200))).unwrap();
    }
    block_on(engine.close()).unwrap();
    let shard = dir.path().join("shard-0000");
    let last = std::fs::read_dir(&shard)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    let end = bytes.iter().rposition(|b| *b != 0).unwrap();
    // Inside the records, well before the end: acknowledged records follow.
    let at = 4096 + (end - 4096) / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&last, bytes).unwrap();
    let mut replica = one_shard();
    replica.tail_refetchable = true;
    let refused = Engine::open(dir.path(), replica);
    assert!(refused.is_err(), "the damage was cut, not refused");
}
