//! Replays the checked-in fuzz corpus (fuzz/corpus/*) through the same entry
//! points the cargo-fuzz targets call, so CI covers it without a fuzzer, and
//! adds a quick property test on random bytes.

mod common;

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tidewal::format::{RecordKind, encode_record};
use tidewal::fuzzing::{FUZZ_LOG, frame_decode, record_decode, recovery_scan, resp_parse};

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

#[test]
fn frame_decode_corpus() {
    assert!(replay("frame_decode", frame_decode) >= 4);
}

#[test]
fn resp_parse_corpus() {
    assert!(replay("resp_parse", resp_parse) >= 4);
}

proptest! {
    #[test]
    fn record_decode_random(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        record_decode(&data);
    }

    #[test]
    fn frame_decode_random(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        frame_decode(&data);
    }

    #[test]
    fn resp_parse_random(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        resp_parse(&data);
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

/// Writes the seeds of the frame and RESP targets:
/// `cargo test --test fuzz_corpus -- --ignored regenerate_frame_and_resp`.
#[test]
#[ignore]
fn regenerate_frame_and_resp_seeds() {
    use tidewal::format::{Ack, FrameKind, Heartbeat, Hello, encode_frame};
    use zerocopy::IntoBytes;
    let fd = corpus("frame_decode");
    std::fs::create_dir_all(&fd).unwrap();
    let frame = |kind, payload: &[u8]| {
        let mut v = Vec::new();
        encode_frame(&mut v, kind, 1, 3, 8192, payload);
        v
    };
    let hello = Hello {
        cluster_id: *b"tidewal-fuzz\0\0\0\0",
        shard_count: 4,
        lsn: 8192,
        chain: 0x1234_5678,
        history: vec![(1, 0), (3, 4096)],
        node_id: "replica-1".into(),
    };
    let ack = Ack {
        written: 9000.into(),
        flushed: 8192.into(),
        applied: 8192.into(),
    };
    let hb = Heartbeat {
        head_lsn: 9000.into(),
        durable_lsn: 9000.into(),
        unix_micros: 1.into(),
    };
    let mut records = Vec::new();
    encode_record(
        &mut records,
        RecordKind::Data,
        3,
        8192,
        7,
        0,
        b"replicated bytes",
    );
    let mut flipped = frame(FrameKind::Records, &records);
    flipped[50] ^= 2;
    for (name, bytes) in [
        ("hello", frame(FrameKind::Hello, &hello.encode())),
        ("ack", frame(FrameKind::Ack, ack.as_bytes())),
        ("heartbeat", frame(FrameKind::Heartbeat, hb.as_bytes())),
        ("records", frame(FrameKind::Records, &records)),
        ("refuse", frame(FrameKind::Refuse, b"epoch 2 is below 3")),
        ("flipped", flipped),
    ] {
        std::fs::write(fd.join(name), bytes).unwrap();
    }
    let rp = corpus("resp_parse");
    std::fs::create_dir_all(&rp).unwrap();
    let seeds: [(&str, &[u8]); 6] = [
        (
            "set-get",
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
        ),
        ("inline", b"PING\r\nset k \"a b\\x41\" 'c\\'d'\n"),
        ("truncated", b"*2\r\n$3\r\nGET\r\n$5\r\nhel"),
        ("bad-length", b"*1\r\n$-3\r\n"),
        ("empty", b"*0\r\n\r\n"),
        ("huge-count", b"*999999999\r\n"),
    ];
    for (name, bytes) in seeds {
        std::fs::write(rp.join(name), bytes).unwrap();
    }
}
