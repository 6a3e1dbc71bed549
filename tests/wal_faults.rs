//! A failed write or sync is fatal for the shard's log: no retry, no ack
//! after it, the same clear error to every waiter and every later append.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use common::*;
use tidewal::format::RecordKind;
use tidewal::io::{FaultOp, FaultStorage, PowerCut};
use tidewal::wal::{Wal, WalError};

/// Runs 32 appenders with `fault` armed after the log is open; returns the
/// outcome of every append as `(end_lsn or error, order resolved)`.
async fn appends_around_fault(
    fault: FaultOp,
    skip: u64,
    errno: i32,
) -> (Vec<Result<u64, WalError>>, u64) {
    let storage = FaultStorage::new();
    let wal = Rc::new(Wal::open(storage.clone(), small_options()).await.unwrap());
    storage.fail(fault, skip, errno);
    let outcomes = Rc::new(RefCell::new(Vec::new()));
    let tasks: Vec<_> = (0..32)
        .map(|who| {
            let (wal, outcomes) = (wal.clone(), outcomes.clone());
            glommio::spawn_local(async move {
                for seq in 0..50 {
                    let r = wal.append(RecordKind::Data, &body(who, seq, 200)).await;
                    outcomes.borrow_mut().push(r.map(|r| r.end_lsn));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
    let durable = wal.durable_lsn();
    let failure = wal.failure().expect("the log reports its failure");
    assert!(
        matches!(failure, WalError::Failed(ref e) if e.errno() == Some(errno)),
        "{failure}"
    );
    let outcomes = Rc::try_unwrap(outcomes).unwrap().into_inner();
    // After the failure every append fails at once, before staging anything.
    let late = wal.append(RecordKind::Data, b"late").await.unwrap_err();
    assert!(matches!(late, WalError::Failed(_)), "{late}");
    assert_eq!(
        wal.durable_lsn(),
        durable,
        "nothing became durable after the failure"
    );

    // What was acked survives a power cut; nothing acked lies past `durable`.
    drop(wal);
    storage.power_cut(PowerCut::DropUnsynced);
    let wal = Wal::open(storage, small_options()).await.unwrap();
    assert!(wal.recovery().end_lsn >= durable);
    (outcomes, durable)
}

fn check(outcomes: &[Result<u64, WalError>], durable: u64, errno: i32) {
    let acked: Vec<u64> = outcomes
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    let failed = outcomes.iter().filter(|r| r.is_err()).count();
    assert!(failed > 0, "the fault hit some append");
    assert!(
        acked.iter().all(|end| *end <= durable),
        "an ack past the last good sync"
    );
    for r in outcomes.iter().filter_map(|r| r.as_ref().err()) {
        match r {
            WalError::Failed(e) => assert_eq!(e.errno(), Some(errno), "{e}"),
            other => panic!("unexpected error {other}"),
        }
    }
}

#[test]
fn eio_on_sync_fails_every_later_append() {
    run(|| async {
        let (outcomes, durable) = appends_around_fault(FaultOp::Sync, 3, libc::EIO).await;
        check(&outcomes, durable, libc::EIO);
        // Appends resolve in LSN order, so successes are a prefix.
        let first_err = outcomes.iter().position(|r| r.is_err()).unwrap();
        assert!(
            outcomes[first_err..].iter().all(|r| r.is_err()),
            "an append resolved Ok after the failed sync"
        );
    });
}

#[test]
fn eio_on_the_very_first_sync() {
    run(|| async {
        let (outcomes, durable) = appends_around_fault(FaultOp::Sync, 0, libc::EIO).await;
        check(&outcomes, durable, libc::EIO);
        assert!(outcomes.iter().all(|r| r.is_err()));
    });
}

#[test]
fn enospc_on_write_is_fatal_too() {
    run(|| async {
        let (outcomes, durable) = appends_around_fault(FaultOp::Write, 5, libc::ENOSPC).await;
        check(&outcomes, durable, libc::ENOSPC);
    });
}

#[test]
fn failure_while_rotating_segments() {
    run(|| async {
        let (outcomes, durable) = appends_around_fault(FaultOp::SyncDir, 1, libc::EIO).await;
        check(&outcomes, durable, libc::EIO);
    });
}

#[test]
fn close_reports_the_failure() {
    run(|| async {
        let storage = FaultStorage::new();
        let wal = Wal::open(storage.clone(), small_options()).await.unwrap();
        storage.fail(FaultOp::Sync, 0, libc::EIO);
        assert!(wal.append(RecordKind::Data, b"x").await.is_err());
        let err = wal.close().await.unwrap_err();
        assert!(err.to_string().contains("failed"), "{err}");
    });
}
