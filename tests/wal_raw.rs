//! A log fed another log's records byte for byte (what a replica does with
//! its upstream's stream): the two logs end up identical, record for record
//! and chain for chain, and records that do not continue the log are
//! refused whole.

#[macro_use]
mod common;

use common::*;
use tidewal::format::RecordKind;
use tidewal::wal::{Wal, WalError};

async fn raw_replay_is_byte_identical<B: Backend>(b: B) {
    let (primary_store, replica_store) = (b.storage().await, b.other_storage().await);
    let mut options = small_options();
    options.epoch = 3;
    let primary = Wal::open(primary_store, options).await.unwrap();
    for i in 0..300 {
        let kind = if i % 50 == 0 {
            RecordKind::Noop
        } else {
            RecordKind::Data
        };
        primary
            .append(kind, &body(0, i, 10 + i % 700))
            .await
            .unwrap();
    }
    let records = read_all_records(&primary).await;
    assert_eq!(records.len(), 300);

    // The replica starts at epoch 1: the upstream's records carry 3.
    let replica = Wal::open(replica_store.clone(), small_options())
        .await
        .unwrap();
    // Fed in uneven batches, as frames would bring them.
    let mut i = 0;
    while i < records.len() {
        let n = 1 + i % 7;
        let batch: Vec<u8> = records[i..(i + n).min(records.len())]
            .iter()
            .flat_map(|r| r.encoded.iter().copied())
            .collect();
        replica.wait_for_space().await.unwrap();
        let pending = replica.submit_raw(&batch).unwrap().expect("records staged");
        if i % 3 == 0 {
            pending.await.unwrap();
        }
        i += n;
    }
    assert_eq!(
        replica.next_position(),
        primary.next_position(),
        "same (lsn, chain, epoch)"
    );
    // A record that does not continue the log is refused, and nothing of
    // its batch is staged: here, the primary's first record again.
    let before = replica.next_position();
    let mut stale = records[299].encoded.to_vec();
    stale.extend_from_slice(&records[0].encoded);
    let Err(err) = replica.submit_raw(&stale) else {
        panic!("a record out of place was staged");
    };
    assert!(matches!(err, WalError::Rejected { .. }), "{err}");
    assert_eq!(replica.next_position(), before, "nothing staged");
    // A flipped bit in a body is refused too.
    let next = replica.next_position();
    let primary_next = primary.append(RecordKind::Data, b"one more").await.unwrap();
    assert_eq!(primary_next.lsn, next.lsn);
    let more = read_all_records(&primary).await.pop().unwrap();
    let mut flipped = more.encoded.to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x10;
    assert!(matches!(
        replica.submit_raw(&flipped),
        Err(WalError::Rejected { .. })
    ));
    // A cut record is refused.
    assert!(matches!(
        replica.submit_raw(&more.encoded[..more.encoded.len() - 1]),
        Err(WalError::Rejected { .. })
    ));
    replica
        .submit_raw(&more.encoded)
        .unwrap()
        .unwrap()
        .await
        .unwrap();
    // Records of epoch 3 arrived: this log may not write under epoch 1.
    assert!(matches!(
        replica.submit(RecordKind::Data, b"local"),
        Err(WalError::EpochRegressed { epoch: 1, last: 3 })
    ));
    let theirs = read_all_records(&primary).await;
    let ours = read_all_records(&replica).await;
    assert_eq!(ours, theirs, "identical records, headers included");
    primary.close().await.unwrap();
    replica.close().await.unwrap();

    // And it recovers as the same log.
    let mut options = small_options();
    options.epoch = 3;
    let reopened = Wal::open(replica_store, options).await.unwrap();
    assert_eq!(read_all_records(&reopened).await, theirs);
    reopened.close().await.unwrap();
}

both_backends!(raw_replay_is_byte_identical);
