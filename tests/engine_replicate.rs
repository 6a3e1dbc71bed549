//! One engine's shards fed another engine's logs, record bytes as on disk
//! (what replication will carry): the copy converges to the same `(lsn,
//! chain)` per shard and the same data, keeps it across a restart, and
//! refuses a batch that does not continue its log.

mod common;

use bytes::Bytes;
use common::disk_dir;
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
    assert_eq!(all(&replica), all(&primary));

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
