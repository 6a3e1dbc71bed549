//! Replays the checked-in fuzz corpus (fuzz/corpus/*) through the same entry
//! points the cargo-fuzz targets call, so CI covers it without a fuzzer, and
//! adds a quick property test on random bytes.

mod common;

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tidewal::format::{RecordKind, encode_record};
use tidewal::fuzzing::{FUZZ_LOG, record_decode, recovery_scan};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = corpus(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        f(&std::fs::read(&path).unwrap());
        n += 1;
    }
    n
}

#[test]
fn record_decode_corpus() {
    assert!(replay("record_decode", record_decode) >= 5);
}

#[test]
fn recovery_scan_corpus() {
    assert!(replay("recovery_scan", recovery_scan) >= 3);
}

proptest! {
    #[test]
    fn record_decode_random(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        record_decode(&data);
    }

    #[test]
    fn recovery_scan_random(data in proptest::collection::vec(any::<u8>(), 0..9000)) {
        recovery_scan(&data);
    }
}

/// Writes the seed corpus. Run by hand after a format change:
/// `cargo test --test fuzz_corpus -- --ignored regenerate`.
#[test]
#[ignore]
fn regenerate_seed_corpus() {
    let rd = corpus("record_decode");
    std::fs::create_dir_all(&rd).unwrap();
    let expect = |lsn: u64, chain: u32, epoch: u64| {
        let mut v = lsn.to_le_bytes().to_vec();
        v.extend(chain.to_le_bytes());
        v.extend(epoch.to_le_bytes());
        v
    };
    let mut valid = expect(4096, 7, 1);
    encode_record(
        &mut valid,
        RecordKind::Data,
        2,
        4096,
        7,
        1024,
        b"hello, fuzzer",
    );
    let mut empty_body = expect(0, 0, 0);
    encode_record(&mut empty_body, RecordKind::Noop, 1, 0, 0, 0, b"");
    let mut zeros = expect(0, 0, 0);
    zeros.extend([0u8; 64]);
    let truncated = valid[..valid.len() - 3].to_vec();
    let mut flipped = valid.clone();
    flipped[30] ^= 4;
    for (name, bytes) in [
        ("valid", valid),
        ("empty-body", empty_body),
        ("zeros", zeros),
        ("truncated", truncated),
        ("flipped", flipped),
    ] {
        std::fs::write(rd.join(name), bytes).unwrap();
    }

    let rs = corpus("recovery_scan");
    std::fs::create_dir_all(&rs).unwrap();
    let storage = tidewal::FaultStorage::new();
    common::run({
        let storage = storage.clone();
        move || async move {
            let mut o = tidewal::WalOptions::new(FUZZ_LOG);
            o.segment_bytes = 8 << 10;
            let wal = tidewal::Wal::open(storage, o).await.unwrap();
            for i in 0..60 {
                wal.append(RecordKind::Data, &common::body(0, i, 80))
                    .await
                    .unwrap();
            }
            wal.close().await.unwrap();
        }
    });
    let mut names: Vec<_> = storage
        .file_names()
        .into_iter()
        .filter(|n| n.ends_with(".wal"))
        .collect();
    names.sort();
    let first = storage.contents(&names[0]).unwrap();
    let second = storage.contents(&names[1]).unwrap();
    let two = |a: &[u8], b: &[u8]| {
        let mut v = vec![(a.len() * 256 / (a.len() + b.len())) as u8];
        v.extend(a);
        v.extend(b);
        v
    };
    let mut torn = second.clone();
    torn[4096 + 200] ^= 1;
    std::fs::write(rs.join("two-segments"), two(&first, &second)).unwrap();
    std::fs::write(rs.join("torn-tail"), two(&first, &torn)).unwrap();
    let mut one = vec![0u8];
    one.extend(&first);
    std::fs::write(rs.join("one-segment"), one).unwrap();
}
