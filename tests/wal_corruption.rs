//! Corruption sweep: every single-bit flip in every byte of a small
//! multi-segment log is either detected (recovery refuses or cuts there, and
//! `tidewal wal inspect` reports it) or lands in bytes no record uses. No
//! corrupt record is ever served.

mod common;

use common::*;
use tidewal::FaultStorage;
use tidewal::format::RecordKind;
use tidewal::wal::{Case, Wal, WalError, WalOptions};

fn options() -> WalOptions {
    let mut o = small_options();
    o.segment_bytes = 8 << 10; // a header block and one block of records
    o.batch_bytes_max = 1 << 10;
    o
}

#[derive(Default, Debug)]
struct Tally {
    refused: u64,
    cut: u64,
    unused: u64,
}

#[test]
fn every_bit_flip_is_detected_or_harmless() {
    run(|| async {
        let pristine = FaultStorage::new();
        let wal = Wal::open(pristine.clone(), options()).await.unwrap();
        for i in 0..100 {
            wal.append(RecordKind::Data, &body(0, i, 20 + 17 * (i % 9)))
                .await
                .unwrap();
        }
        let original = read_all_records(&wal).await;
        wal.close().await.unwrap();
        let names: Vec<String> = pristine
            .file_names()
            .into_iter()
            .filter(|n| n.ends_with(".wal"))
            .collect();
        assert!(
            names.len() >= 3,
            "the log spans several segments: {names:?}"
        );

        let mut tally = Tally::default();
        for name in &names {
            let len = pristine.contents(name).unwrap().len();
            for offset in 0..len {
                for bit in 0..8 {
                    let storage = pristine.snapshot();
                    storage.flip_bit(name, offset, bit);
                    let at = format!("{name} byte {offset} bit {bit}");
                    match Wal::open(storage, options()).await {
                        Err(WalError::Corrupt { refusal }) => {
                            assert_eq!(
                                refusal.segment, *name,
                                "{at}: refusal names the wrong segment"
                            );
                            assert!(
                                refusal.offset as usize <= offset,
                                "{at}: refusal after the flip"
                            );
                            tally.refused += 1;
                        }
                        Err(other) => panic!("{at}: untyped failure {other}"),
                        Ok(wal) => {
                            let served = read_all_records(&wal).await;
                            // Whatever is served is exactly what was written.
                            assert!(served.len() <= original.len(), "{at}");
                            for (got, want) in served.iter().zip(&original) {
                                assert_eq!(got, want, "{at}: a corrupt record was served");
                            }
                            match wal.recovery().case {
                                Case::TornTail => {
                                    let cut = wal.recovery().cut.clone().unwrap();
                                    assert_eq!(cut.segment, *name, "{at}");
                                    assert!(cut.offset as usize <= offset, "{at}");
                                    tally.cut += 1;
                                }
                                Case::Intact => {
                                    assert_eq!(
                                        served.len(),
                                        original.len(),
                                        "{at}: records lost silently"
                                    );
                                    tally.unused += 1;
                                }
                                other => panic!("{at}: unexpected case {other:?}"),
                            }
                        }
                    }
                }
            }
        }
        eprintln!("bit flips: {tally:?}");
        assert!(
            tally.refused > 0 && tally.cut > 0 && tally.unused > 0,
            "{tally:?}"
        );
    });
}

#[test]
fn inspect_reports_what_recovery_refuses() {
    let dir = disk_dir();
    let p = path(&dir);
    let b = Disk(std::rc::Rc::new(dir));
    {
        let b = b.clone();
        run(move || async move {
            let wal = Wal::open(b.storage().await, options()).await.unwrap();
            for i in 0..60 {
                wal.append(RecordKind::Data, &body(0, i, 100))
                    .await
                    .unwrap();
            }
            wal.close().await.unwrap();
        })
    };
    let inspect = |summary: bool| wal_inspect(&p, if summary { &["--summary"] } else { &[] });
    let ok = inspect(false);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert!(stdout.contains("log intact"), "{stdout}");
    assert_eq!(
        stdout.matches("  lsn ").count(),
        60,
        "every record listed:\n{stdout}"
    );

    // Flip a bit in the second segment's first record: inspect names it.
    let second = b.segments()[1].clone();
    b.flip(&second, 4096 + 40, 2);
    let bad = inspect(true);
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("corrupt: segment {second} offset 4096")),
        "{stdout}"
    );
}
