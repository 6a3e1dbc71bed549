//! Golden files of format version 1 (tests/fixtures/v1): a small log that
//! this code must keep reading, record for record, and writing byte for byte,
//! and its corrupt twin that must keep being refused at the same place.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tidewal::format::{LogId, RecordKind};
use tidewal::wal::{Case, Wal, WalError, WalOptions};
use tidewal::{FaultStorage, Storage};

const FIXTURE_LOG: LogId = LogId {
    cluster_id: *b"tidewal-fixture1",
    shard: 7,
};

fn options() -> WalOptions {
    let mut o = WalOptions::new(FIXTURE_LOG);
    o.segment_bytes = 8 << 10;
    o.epoch = 3;
    o
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v1")
        .join(name)
}

/// The records of the golden log, in order.
fn golden_records() -> Vec<(RecordKind, Vec<u8>)> {
    let mut v = vec![(RecordKind::EpochStart, Vec::new())];
    v.extend((0..60).map(|i| (RecordKind::Data, body(3, i, 10 + (i * 7) % 150))));
    v.push((RecordKind::Noop, Vec::new()));
    v
}

/// Writes the golden log with today's code into the fault backend.
async fn write_golden() -> FaultStorage {
    let storage = FaultStorage::new();
    let wal = Wal::open(storage.clone(), options()).await.unwrap();
    for (kind, body) in golden_records() {
        wal.append(kind, &body).await.unwrap();
    }
    wal.close().await.unwrap();
    storage
}

fn segment_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wal"))
        .collect();
    v.sort();
    v
}

/// Loads a fixture directory's segments into a fault backend.
fn load(dir: &Path) -> FaultStorage {
    let storage = FaultStorage::new();
    for name in segment_names(dir) {
        storage.poke(&name, 0, &std::fs::read(dir.join(&name)).unwrap());
    }
    storage
}

#[test]
fn golden_log_reads_back() {
    run(|| async {
        let wal = Wal::open(load(&fixture("intact")), options())
            .await
            .unwrap();
        assert_eq!(wal.recovery().case, Case::Intact);
        let records = read_all_records(&wal).await;
        let want = golden_records();
        assert_eq!(records.len(), want.len());
        for (got, (kind, body)) in records.iter().zip(&want) {
            assert_eq!((got.kind, &got.body[..], got.epoch), (*kind, &body[..], 3));
        }
    });
}

#[test]
fn todays_writer_produces_the_golden_bytes() {
    run(|| async {
        let storage = write_golden().await;
        let dir = fixture("intact");
        let names = segment_names(&dir);
        let mut ours: Vec<String> = storage.list().await.unwrap();
        ours.retain(|n| n.ends_with(".wal"));
        assert_eq!(ours, names);
        for name in names {
            assert!(
                storage.contents(&name).unwrap() == std::fs::read(dir.join(&name)).unwrap(),
                "{name} differs from the golden file: the format changed (new version?)"
            );
        }
    });
}

#[test]
fn corrupt_twin_is_refused_where_it_was() {
    run(|| async {
        match Wal::open(load(&fixture("corrupt")), options()).await {
            Err(WalError::Corrupt { refusal }) => {
                assert_eq!(refusal.case, Case::CorruptRecord);
                let expected = std::fs::read_to_string(fixture("corrupt/EXPECTED")).unwrap();
                assert_eq!(
                    format!("{} {}", refusal.segment, refusal.offset),
                    expected.trim()
                );
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("the corrupt twin opened"),
        }
    });
}

/// Writes the fixtures. Run by hand only when a new format version is made:
/// `cargo test --test format_fixtures -- --ignored regenerate`.
#[test]
#[ignore]
fn regenerate_fixtures() {
    run(|| async {
        let storage = write_golden().await;
        for sub in ["intact", "corrupt"] {
            std::fs::create_dir_all(fixture(sub)).unwrap();
        }
        let mut names: Vec<String> = storage.list().await.unwrap();
        names.retain(|n| n.ends_with(".wal"));
        for name in &names {
            let bytes = storage.contents(name).unwrap();
            std::fs::write(fixture("intact").join(name), &bytes).unwrap();
            std::fs::write(fixture("corrupt").join(name), &bytes).unwrap();
        }
        // One flipped bit in a body byte of the first segment's third record.
        let first = &names[0];
        let mut bytes = storage.contents(first).unwrap();
        let records = read_all_records(&Wal::open(storage.clone(), options()).await.unwrap()).await;
        let offset = 4096 + records[2].lsn as usize;
        bytes[offset + 40] ^= 0x08;
        std::fs::write(fixture("corrupt").join(first), &bytes).unwrap();
        std::fs::write(fixture("corrupt/EXPECTED"), format!("{first} {offset}\n")).unwrap();
    });
}
