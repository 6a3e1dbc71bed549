//! Appending, reading back, reopening and releasing, on both backends.

mod common;

use common::*;
use tidewal::format::RecordKind;
use tidewal::io::{DirectIo, DmaStorage, FaultStorage, Storage, SyncMode};
use tidewal::wal::{Case, Wal};

async fn append_read_reopen<S: Storage + Clone + 'static>(storage: S) {
    let wal = Wal::open(storage.clone(), small_options()).await.unwrap();
    assert_eq!(wal.recovery().case, Case::Empty);
    let mut receipts = Vec::new();
    for i in 0..500 {
        let r = wal
            .append(RecordKind::Data, &body(0, i, 10 + i % 300))
            .await
            .unwrap();
        receipts.push(r);
    }
    assert!(wal.segment_count() > 1, "records crossed segments");
    assert_eq!(wal.durable_lsn(), receipts.last().unwrap().end_lsn);
    let records = read_all_records(&wal).await;
    assert_eq!(records.len(), 500);
    for (i, (rec, receipt)) in records.iter().zip(&receipts).enumerate() {
        assert_eq!(rec.lsn, receipt.lsn);
        assert_eq!(&rec.body[..], &body(0, i, 10 + i % 300)[..]);
    }
    let end = wal.durable_lsn();
    wal.close().await.unwrap();

    let wal = Wal::open(storage.clone(), small_options()).await.unwrap();
    assert_eq!(wal.recovery().case, Case::Intact);
    assert_eq!(wal.recovery().end_lsn, end);
    assert_eq!(wal.recovery().records, 500);
    let r = wal.append(RecordKind::Data, b"after reopen").await.unwrap();
    assert_eq!(r.lsn, end);
    let records = read_all_records(&wal).await;
    assert_eq!(records.len(), 501);
    assert_eq!(&records[500].body[..], b"after reopen");

    // Retention: release everything below the last record; only later
    // segments stay, and reading from the oldest kept position still works.
    let before = wal.segment_count();
    let released = wal.release_below(r.lsn).await.unwrap();
    assert!(released > 0 && wal.segment_count() == before - released);
    let kept = read_all_records(&wal).await;
    assert_eq!(kept.last().unwrap().lsn, r.lsn);
    wal.close().await.unwrap();
    let wal = Wal::open(storage, small_options()).await.unwrap();
    assert_eq!(wal.recovery().end_lsn, r.end_lsn);
    wal.close().await.unwrap();
}

#[test]
fn fault_backend_append_read_reopen() {
    run(|| append_read_reopen(FaultStorage::new()));
}

#[test]
fn disk_backend_append_read_reopen() {
    let dir = disk_dir();
    let p = path(&dir);
    run(move || async move {
        let storage = DmaStorage::open(&p, DirectIo::Require).await.unwrap();
        assert!(storage.direct_io());
        assert_eq!(storage.sync_mode(), SyncMode::Dsync, "the default");
        append_read_reopen(storage).await
    });
}

#[test]
fn disk_backend_with_fdatasync_append_read_reopen() {
    let dir = disk_dir();
    let p = path(&dir);
    run(move || async move {
        let storage = DmaStorage::open(&p, DirectIo::Require)
            .await
            .unwrap()
            .with_sync_mode(SyncMode::Fdatasync);
        append_read_reopen(storage).await
    });
}

#[test]
fn concurrent_appends_share_syncs() {
    run(|| async {
        let wal = std::rc::Rc::new(
            Wal::open(FaultStorage::new(), small_options())
                .await
                .unwrap(),
        );
        let tasks: Vec<_> = (0..64)
            .map(|who| {
                let wal = wal.clone();
                glommio::spawn_local(async move {
                    for seq in 0..20 {
                        wal.append(RecordKind::Data, &body(who, seq, 100))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        assert_eq!(wal.recovery().records, 0);
        assert_eq!(read_data_records(&wal).await.len(), 64 * 20);
    });
}

/// Batches large enough to be kept in memory without a copy read back the
/// same, from memory (the newest) and from the disk (older ones), while
/// later batches reuse the buffers the cache let go of.
#[test]
fn large_batches_read_back_the_same_from_memory_and_disk() {
    run(|| async {
        let mut options = small_options();
        options.segment_bytes = 8 << 20;
        options.batch_bytes_max = 1 << 20;
        options.staged_bytes_max = 4 << 20;
        let wal = std::rc::Rc::new(Wal::open(FaultStorage::new(), options).await.unwrap());
        let tasks: Vec<_> = (0..16)
            .map(|who| {
                let wal = wal.clone();
                glommio::spawn_local(async move {
                    for seq in 0..40 {
                        wal.append(RecordKind::Data, &body(who, seq, 60 << 10))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        let records = read_data_records(&wal).await;
        assert_eq!(records.len(), 16 * 40);
        // 40 MiB of records: the oldest are past what memory keeps.
        let stats = wal.stats();
        assert!(stats.reads_from_disk > 0, "some reads went to the disk");
        assert!(stats.reads_from_memory > 0, "the newest came from memory");
        let mut next = [0; 16];
        for r in &records {
            let (who, seq) = parse_body(&r.body).expect("a body as appended");
            assert_eq!(r.body.len(), 60 << 10);
            assert_eq!(seq, next[who], "appender {who}'s records in order");
            next[who] += 1;
        }
    });
}

/// A read of many 128 KiB chunks (issued all at once) returns the file's
/// bytes in order, from any offset, and only what exists at its end.
#[test]
fn disk_reads_of_many_chunks_come_back_in_order() {
    use tidewal::io::StorageFile;
    let dir = disk_dir();
    let p = path(&dir);
    run(move || async move {
        let storage = DmaStorage::open(&p, DirectIo::Require).await.unwrap();
        let file = storage.create("chunks").await.unwrap();
        let len = 700 << 10;
        let bytes: Vec<u8> = (0..len).map(|i| (i / 4096 * 7 + i % 251) as u8).collect();
        file.write_at(0, &[&bytes]).await.unwrap();
        file.sync().await.unwrap();
        for (pos, want) in [(0, len), (4096, 600 << 10), (100, (300 << 10) + 7), (0, 1)] {
            let got = file.read_at(pos as u64, want).await.unwrap();
            assert_eq!(got.len(), want, "read of {want} at {pos}");
            assert!(got == bytes[pos..pos + want], "bytes of {want} at {pos}");
        }
        // Past the end: the rest of the file, nothing more.
        let size = file.file_size().await.unwrap();
        for want in [6000, 100_000, 1 << 20] {
            let got = file.read_at((len - 5000) as u64, want).await.unwrap();
            assert!(
                got == bytes[len - 5000..],
                "the tail: {} bytes, file {size}",
                got.len()
            );
        }
    });
}

#[test]
fn oversized_record_is_refused() {
    run(|| async {
        let wal = Wal::open(FaultStorage::new(), small_options())
            .await
            .unwrap();
        let huge = vec![1u8; 64 << 10];
        let err = wal.append(RecordKind::Data, &huge).await.unwrap_err();
        assert!(matches!(err, tidewal::WalError::TooLarge { .. }), "{err}");
        wal.append(RecordKind::Data, b"still fine").await.unwrap();
    });
}

#[test]
fn tmpfs_is_refused_unless_allowed() {
    if !std::path::Path::new("/dev/shm").is_dir() {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let p = path(&dir);
    run(move || async move {
        let err = DmaStorage::open(&p, DirectIo::Require).await.unwrap_err();
        assert!(err.to_string().contains("O_DIRECT"), "{err}");
        let storage = DmaStorage::open(&p, DirectIo::AllowBuffered).await.unwrap();
        assert!(!storage.direct_io());
    });
}

/// Under back-pressure, appenders that wait for staging space are served
/// first come, first served: one that arrives when space has just been
/// freed still waits behind those already waiting. That is what keeps
/// appends issued in some order (a client's pipeline) staged in that order.
#[test]
fn back_pressure_keeps_issue_order() {
    use futures_lite::future::poll_once;
    run(|| async {
        let mut options = small_options();
        options.staged_bytes_max = options.batch_bytes_max;
        let wal = Wal::open(FaultStorage::new(), options).await.unwrap();
        // Over the staging cap, with no await: nothing is written yet.
        for i in 0..20 {
            drop(wal.submit(RecordKind::Data, &body(0, i, 700)).unwrap());
        }
        {
            let first = wal.wait_for_space();
            let mut first = std::pin::pin!(first);
            assert!(
                poll_once(first.as_mut()).await.is_none(),
                "over the cap: waits"
            );
            // The flusher takes the staged runs: space is free again.
            for _ in 0..10 {
                futures_lite::future::yield_now().await;
            }
            let second = wal.wait_for_space();
            let mut second = std::pin::pin!(second);
            assert!(
                poll_once(second.as_mut()).await.is_none(),
                "a later appender barged in ahead of one already waiting"
            );
            assert!(
                poll_once(first.as_mut()).await.is_some(),
                "the first goes first"
            );
            drop(wal.submit(RecordKind::Data, b"first").unwrap());
            assert!(
                poll_once(second.as_mut()).await.is_some(),
                "then the second"
            );
            drop(wal.submit(RecordKind::Data, b"second").unwrap());
        }
        wal.wait_for_space().await.unwrap();
        let p = wal.submit(RecordKind::Data, b"last").unwrap();
        p.await.unwrap();
        assert!(
            !wal.stats().batch_records.is_empty(),
            "batches were recorded"
        );
        wal.close().await.unwrap();
    });
}

/// Staged appends may be awaited in any order, each by its own task, and
/// polled more than once: every task is woken with its own receipt once a
/// sync covers its record, whether its waiter is the newest (the usual
/// case, looked at first) or an older one.
#[test]
fn staged_appends_wake_their_own_tasks() {
    use futures_lite::future::poll_once;
    use std::time::Duration;
    run(|| async {
        let wal = Wal::open(FaultStorage::new(), small_options())
            .await
            .unwrap();
        let mut pending: Vec<_> = (0..5)
            .map(|i| wal.submit(RecordKind::Data, &body(0, i, 50)).unwrap())
            .collect();
        let receipts: Vec<_> = pending.iter().map(|p| p.receipt()).collect();
        // Nothing is durable yet (the flusher has not run): a poll waits.
        assert!(
            poll_once(&mut pending[2]).await.is_none(),
            "not durable yet"
        );
        // One task per append, started oldest first, so the first to wait
        // are the ones whose waiters are not the newest. A waker kept on
        // the wrong waiter would leave a task asleep until the timeout.
        let tasks: Vec<_> = pending
            .into_iter()
            .map(|p| glommio::spawn_local(p).detach())
            .collect();
        let got = glommio::timer::timeout(Duration::from_secs(10), async {
            let mut got = Vec::new();
            for task in tasks {
                got.push(task.await.expect("task ran").unwrap());
            }
            Ok(got)
        })
        .await
        .expect("every task woken");
        assert_eq!(got, receipts);
        assert_eq!(wal.durable_lsn(), receipts[4].end_lsn);
        wal.close().await.unwrap();
    });
}

/// Batches written beside others are padded to a block boundary with
/// `Noop` records, the readers still see every record in order, and a log
/// whose last write was such a batch, in a recycled segment (an older
/// life's bytes right after it), reopens intact after a clean close.
async fn padded_batches_reopen_intact<S: Storage + Clone + 'static>(storage: S) {
    {
        let mut options = small_options();
        options.segment_bytes = 128 << 10;
        options.batch_bytes_max = 64 << 10;
        options.staged_bytes_max = 256 << 10;
        let wal = std::rc::Rc::new(Wal::open(storage.clone(), options.clone()).await.unwrap());
        // Herds of 16 appenders of 2 KB records: each herd's batch is large
        // enough to be split and padded. Releasing as the log grows makes
        // later segments recycled files.
        for seq in 0..40 {
            let tasks: Vec<_> = (0..16)
                .map(|who| {
                    let wal = wal.clone();
                    glommio::spawn_local(async move {
                        wal.append(RecordKind::Data, &body(who, seq, 2000))
                            .await
                            .unwrap()
                    })
                })
                .collect();
            for t in tasks {
                t.await;
            }
            wal.release_below(wal.durable_lsn()).await.unwrap();
        }
        assert!(wal.stats().pad_bytes > 0, "batches were padded");
        let records = read_all_records(&wal).await;
        let pads = records.iter().filter(|r| r.kind == RecordKind::Noop);
        assert!(pads.clone().count() > 0);
        for pad in pads {
            assert!(pad.body.iter().all(|b| *b == 0) && pad.body.len() < 8192);
        }
        let end = wal.durable_lsn();
        let data = read_data_records(&wal).await;
        let wal = std::rc::Rc::try_unwrap(wal).ok().unwrap();
        wal.close().await.unwrap();

        let wal = Wal::open(storage, options).await.unwrap();
        // Intact, not a torn tail: zeros follow the last record. (What the
        // file's older life left further on is zeroed as the log opens.)
        assert_eq!(wal.recovery().case, Case::Intact);
        assert_eq!(wal.recovery().end_lsn, end);
        assert_eq!(read_data_records(&wal).await, data);
    }
}

#[test]
fn padded_batches_in_recycled_segments_reopen_intact() {
    run(|| padded_batches_reopen_intact(FaultStorage::new()));
}

/// The same on the disk, where writes in flight complete in any order.
#[test]
fn disk_backend_padded_batches_reopen_intact() {
    let dir = disk_dir();
    let p = path(&dir);
    let log_dir = p.clone();
    run(move || async move {
        let storage = DmaStorage::open(&p, DirectIo::Require).await.unwrap();
        padded_batches_reopen_intact(storage).await
    });
    // `wal inspect` lists the padding as no-op records of an intact log.
    let out = wal_inspect(&log_dir, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("log intact"), "{stdout}");
    assert!(stdout.contains("noop"), "{stdout}");
}

/// A zero fill asks its pace before each write: two 1 MiB writes at once
/// when told `Urgent` (one, short, at the end of the file), one when
/// `Fast`, 128 KiB when `Gentle`, and nothing until the future resolves
/// when told `Wait` (then it asks again at the same offset). The file ends
/// up all zeros, as long as asked.
#[test]
fn zero_fill_goes_at_the_pace_it_is_told() {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::Duration;
    use tidewal::io::{ZeroPace, zero_fill};
    const MIB: u64 = 1 << 20;
    const K: u64 = 128 << 10;
    run(|| async {
        let storage = FaultStorage::new();
        let file = storage.create("z").await.unwrap();
        let asked = Rc::new(RefCell::new(Vec::new()));
        let waited = Rc::new(std::cell::Cell::new(false));
        let pace = {
            let (asked, waited) = (asked.clone(), waited.clone());
            move |at: u64| {
                asked.borrow_mut().push(at);
                match at {
                    _ if at < 2 * MIB => ZeroPace::Urgent,
                    _ if at < 3 * MIB => ZeroPace::Fast,
                    _ if at == 3 * MIB + K && !waited.get() => {
                        let waited = waited.clone();
                        ZeroPace::Wait(Box::pin(async move {
                            glommio::timer::sleep(Duration::from_millis(5)).await;
                            waited.set(true);
                        }))
                    }
                    _ if at == 3 * MIB + 3 * K => ZeroPace::Urgent,
                    _ => ZeroPace::Gentle,
                }
            }
        };
        let len = 3 * MIB + 3 * K + 4096;
        zero_fill(&file, len, pace).await.unwrap();
        assert!(waited.get(), "the fill waited when told to");
        assert_eq!(
            *asked.borrow(),
            vec![
                0,
                2 * MIB,
                3 * MIB,
                3 * MIB + K,
                3 * MIB + K,
                3 * MIB + 2 * K,
                3 * MIB + 3 * K
            ]
        );
        let contents = storage.contents("z").unwrap();
        assert_eq!(contents.len() as u64, len);
        assert!(contents.iter().all(|&b| b == 0));
    });
}

/// A log that writes slowly does not have its next segment zero-filled at
/// the device's full speed: the zeros keep a lead of about 16 MiB over the
/// current segment's use and then follow the log. A log that outgrows the
/// lead still rotates into the spare, and closing does not wait for the
/// log: the spare is finished at once, whole and all zeros.
#[test]
fn spare_zeros_follow_a_slow_log() {
    use std::time::Duration;
    const MIB: usize = 1 << 20;
    run(|| async {
        let storage = FaultStorage::new();
        let mut options = small_options();
        options.segment_bytes = 64 << 20;
        options.batch_bytes_max = 1 << 20;
        options.staged_bytes_max = 4 << 20;
        // The first segment exists (it is prepared at once, as the log has
        // none); the spare for the next one is being zero-filled.
        let wal = Wal::open(storage.clone(), options).await.unwrap();
        wal.append(RecordKind::Data, b"first").await.unwrap();
        let tmp_len = |storage: &FaultStorage| -> usize {
            storage
                .file_names()
                .iter()
                .filter(|n| n.ends_with(".spare.tmp"))
                .map(|n| storage.contents(n).unwrap().len())
                .sum()
        };
        glommio::timer::sleep(Duration::from_millis(200)).await;
        let idle = tmp_len(&storage);
        assert!(
            (16 * MIB..=18 * MIB).contains(&idle),
            "zeros stop at their lead while the log is idle: {idle}"
        );
        // 4 MiB more of log: the zeros follow it.
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..64 {
            wal.append(RecordKind::Data, &chunk).await.unwrap();
        }
        glommio::timer::sleep(Duration::from_millis(50)).await;
        let followed = tmp_len(&storage);
        assert!(
            (idle + 3 * MIB..=idle + 6 * MIB).contains(&followed),
            "zeros follow the log: {idle} then {followed}"
        );
        // Past the end of the segment: the log rotates into the spare.
        for _ in 0..1100 {
            wal.append(RecordKind::Data, &chunk).await.unwrap();
        }
        assert_eq!(wal.segment_count(), 2, "rotated once");
        // The next spare reaches its lead and waits for the log; closing
        // finishes it without waiting for the log.
        glommio::timer::sleep(Duration::from_millis(200)).await;
        assert!(tmp_len(&storage) < 32 * MIB, "the next spare waits");
        glommio::timer::timeout(Duration::from_secs(20), async {
            wal.close().await.unwrap();
            Ok(())
        })
        .await
        .expect("close does not wait for the log");
        assert_eq!(tmp_len(&storage), 0, "no spare left half made");
        let spares: Vec<_> = storage
            .file_names()
            .into_iter()
            .filter(|n| n.ends_with(".spare"))
            .collect();
        assert_eq!(spares.len(), 1, "{spares:?}");
        let spare = storage.contents(&spares[0]).unwrap();
        assert_eq!(spare.len(), 64 << 20);
        assert!(spare.iter().all(|&b| b == 0));
    });
}
