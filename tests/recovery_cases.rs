//! Walks every row of the recovery decision table (src/wal/recovery.rs), on
//! the fault backend and on the real disk: the log is written by the WAL,
//! then its files are damaged behind its back, then it is reopened.

#[macro_use]
mod common;

use common::*;
use tidewal::format::{RecordKind, parse_segment_file_name, segment_file_name};
use tidewal::wal::{Case, Wal, WalError, WalOptions, offset_of};

fn options() -> WalOptions {
    let mut o = small_options();
    o.segment_bytes = 16 << 10;
    o
}

/// Writes `n` records of ~300 bytes across several segments; returns their
/// LSNs and bodies.
async fn write_log<B: Backend>(b: &B, n: usize) -> Vec<(u64, Vec<u8>)> {
    let wal = Wal::open(b.storage().await, options()).await.unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let body = body(1, i, 300);
        let r = wal.append(RecordKind::Data, &body).await.unwrap();
        out.push((r.lsn, body));
    }
    wal.close().await.unwrap();
    out
}

/// The segment holding `lsn` and the file offset of it there.
fn place<B: Backend>(b: &B, lsn: u64) -> (String, usize) {
    let base = b
        .segments()
        .iter()
        .filter_map(|n| parse_segment_file_name(n))
        .filter(|base| *base <= lsn)
        .max()
        .unwrap();
    (segment_file_name(base), offset_of(base, lsn) as usize)
}

async fn reopen<B: Backend>(b: &B) -> Result<Wal<B::S>, WalError> {
    Wal::open(b.storage().await, options()).await
}

async fn bodies<B: Backend>(wal: &Wal<B::S>) -> Vec<Vec<u8>> {
    read_all_records(wal)
        .await
        .into_iter()
        .map(|r| r.body.to_vec())
        .collect()
}

fn refusal(result: Result<Wal<impl tidewal::Storage>, WalError>) -> tidewal::wal::Refusal {
    match result {
        Err(WalError::Corrupt { refusal }) => refusal,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, the log opened"),
    }
}

async fn empty<B: Backend>(b: B) {
    let wal = reopen(&b).await.unwrap();
    assert_eq!(wal.recovery().case, Case::Empty);
    assert_eq!(wal.recovery().end_lsn, 0);
}

async fn intact<B: Backend>(b: B) {
    let written = write_log(&b, 120).await;
    assert!(b.segments().len() >= 3);
    let wal = reopen(&b).await.unwrap();
    assert_eq!(wal.recovery().case, Case::Intact);
    let want: Vec<_> = written.into_iter().map(|(_, body)| body).collect();
    assert_eq!(bodies::<B>(&wal).await, want);
}

async fn torn_tail<B: Backend>(b: B) {
    let written = write_log(&b, 120).await;
    let (last_lsn, _) = written[written.len() - 1];
    let (segment, offset) = place(&b, last_lsn);
    b.flip(&segment, offset + 40, 3); // a body byte of the last record
    let wal = reopen(&b).await.unwrap();
    assert_eq!(wal.recovery().case, Case::TornTail);
    let cut = wal.recovery().cut.clone().unwrap();
    assert_eq!(
        (cut.segment.as_str(), cut.offset as usize),
        (segment.as_str(), offset)
    );
    assert_eq!(wal.recovery().end_lsn, last_lsn);
    assert_eq!(bodies::<B>(&wal).await.len(), 119);
    // The cut is zeroed before new records go in, so the next open is clean.
    let r = wal.append(RecordKind::Data, b"short").await.unwrap();
    assert_eq!(r.lsn, last_lsn);
    wal.close().await.unwrap();
    let wal = reopen(&b).await.unwrap();
    assert_eq!(wal.recovery().case, Case::Intact);
    assert_eq!(bodies::<B>(&wal).await.last().unwrap(), b"short");
}

async fn torn_rotation<B: Backend>(b: B) {
    let written = write_log(&b, 120).await;
    let end = {
        let wal = reopen(&b).await.unwrap();
        let end = wal.recovery().end_lsn;
        wal.close().await.unwrap();
        end
    };
    // A segment whose name became durable but whose header did not.
    let name = segment_file_name(end);
    b.poke(&name, 0, &vec![0u8; 16 << 10]);
    let wal = reopen(&b).await.unwrap();
    assert_eq!(wal.recovery().case, Case::TornRotation);
    assert_eq!(wal.recovery().discarded.as_deref(), Some(name.as_str()));
    assert_eq!(bodies::<B>(&wal).await.len(), written.len());
    wal.close().await.unwrap();
    assert!(!b.segments().contains(&name));
}

async fn corrupt_record_mid_segment<B: Backend>(b: B) {
    let written = write_log(&b, 120).await;
    let (lsn, _) = written[written.len() - 3];
    let (segment, offset) = place(&b, lsn);
    b.flip(&segment, offset + 100, 0);
    let r = refusal(reopen(&b).await);
    assert_eq!(r.case, Case::CorruptRecord);
    assert_eq!((r.segment, r.offset as usize), (segment, offset));
}

/// The same damage in a replica's log (`tail_refetchable`): the proof that
/// the record was acknowledged is the upstream's, so the log is cut there
/// (provisionally) and the rest is fetched again; in an older segment it
/// is still refused.
async fn corrupt_record_of_a_replica_is_cut_for_refetch<B: Backend>(b: B) {
    let written = write_log(&b, 120).await;
    let (lsn, _) = written[written.len() - 3];
    let (segment, offset) = place(&b, lsn);
    b.flip(&segment, offset + 100, 0);
    let replica = WalOptions {
        tail_refetchable: true,
        ..options()
    };
    let wal = Wal::open(b.storage().await, replica.clone()).await.unwrap();
    assert_eq!(wal.recovery().case, Case::TornTail);
    assert_eq!(wal.next_lsn(), lsn);
    let kept: Vec<Vec<u8>> = written[..written.len() - 3]
        .iter()
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(bodies::<B>(&wal).await, kept);
    wal.close().await.unwrap();
    let (lsn, _) = written[written.len() / 4];
    let (segment, offset) = place(&b, lsn);
    b.flip(&segment, offset + 4, 7);
    let r = refusal(Wal::open(b.storage().await, replica).await);
    assert_eq!(r.case, Case::CorruptRecord);
}

/// The same damage in the log of a replica that was promoted and began the
/// records' epoch itself (`own_epoch_max`): they may be its own acked
/// writes, which no upstream holds, so the damage is refused, not cut.
async fn corrupt_record_of_a_promoted_replica_is_refused<B: Backend>(b: B) {
    let written = write_log(&b, 120).await;
    let (lsn, _) = written[written.len() - 3];
    let (segment, offset) = place(&b, lsn);
    b.flip(&segment, offset + 100, 0);
    let promoted = WalOptions {
        tail_refetchable: true,
        own_epoch_max: options().epoch,
        ..options()
    };
    let r = refusal(Wal::open(b.storage().await, promoted).await);
    assert_eq!(r.case, Case::CorruptRecord);
    assert_eq!((r.segment, r.offset as usize), (segment, offset));
    // Records of a later epoch than its own came from an upstream again.
    let replica = WalOptions {
        tail_refetchable: true,
        own_epoch_max: options().epoch - 1,
        ..options()
    };
    let wal = Wal::open(b.storage().await, replica).await.unwrap();
    assert_eq!(wal.recovery().case, Case::TornTail);
    assert_eq!(wal.next_lsn(), lsn);
    wal.close().await.unwrap();
}

async fn corrupt_record_older_segment<B: Backend>(b: B) {
    let written = write_log(&b, 120).await;
    let (lsn, _) = written[written.len() / 4];
    let (segment, offset) = place(&b, lsn);
    assert_ne!(&segment, b.segments().last().unwrap());
    b.flip(&segment, offset + 4, 7); // the length field
    let r = refusal(reopen(&b).await);
    assert_eq!(r.case, Case::CorruptRecord);
    assert_eq!((r.segment, r.offset as usize), (segment, offset));
}

async fn corrupt_header<B: Backend>(b: B) {
    write_log(&b, 120).await;
    let first = b.segments()[0].clone();
    b.flip(&first, 20, 1);
    let r = refusal(reopen(&b).await);
    assert_eq!(r.case, Case::CorruptHeader);
    assert_eq!((r.segment, r.offset), (first, 0));
}

async fn corrupt_header_of_newest_segment<B: Backend>(b: B) {
    write_log(&b, 120).await;
    // A flipped header bit is damage, not a rotation that never became
    // durable: the acked records in the segment must not be set aside.
    let last = b.segments().last().unwrap().clone();
    b.flip(&last, 40, 4);
    let r = refusal(reopen(&b).await);
    assert_eq!(r.case, Case::CorruptHeader);
    assert_eq!((r.segment, r.offset), (last, 0));
}

async fn gap<B: Backend>(b: B) {
    write_log(&b, 120).await;
    let segments = b.segments();
    b.delete(&segments[1]);
    let r = refusal(reopen(&b).await);
    assert_eq!(r.case, Case::Gap);
    assert_eq!(r.segment, segments[2]);
}

both_backends!(
    empty,
    intact,
    torn_tail,
    torn_rotation,
    corrupt_record_mid_segment,
    corrupt_record_of_a_replica_is_cut_for_refetch,
    corrupt_record_of_a_promoted_replica_is_refused,
    corrupt_record_older_segment,
    corrupt_header,
    corrupt_header_of_newest_segment,
    gap
);
