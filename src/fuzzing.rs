//! Fuzz entry points, shared by the `fuzz/` targets and by the test that
//! replays the checked-in corpus (so CI covers the corpus without a fuzzer).
//! Each one panics only when an invariant of the format is broken.

use crate::format::{Decoded, Expect, LogId, decode_record, encode_record};
use crate::wal::{decide, scan_segment};

/// The log identity the recovery corpus is written under.
pub const FUZZ_LOG: LogId = LogId {
    cluster_id: *b"tidewal-fuzz\0\0\0\0",
    shard: 0,
};

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Input: 20 bytes of expectation (lsn u64, chain u32, epoch u64, little
/// endian), then record bytes. A decoded record must re-encode to the same
/// bytes; all-zero headers never decode.
pub fn record_decode(data: &[u8]) {
    if data.len() < 20 {
        return;
    }
    let expect = Expect {
        lsn: u64_at(data, 0),
        chain: u32::from_le_bytes([data[8], data[9], data[10], data[11]]),
        epoch: u64_at(data, 12),
    };
    let buf = &data[20..];
    let Ok(Decoded::Record(r)) = decode_record(buf, expect) else {
        return;
    };
    assert!(
        buf[..32].iter().any(|b| *b != 0),
        "zeros decoded as a record"
    );
    let mut again = Vec::new();
    let chain = encode_record(
        &mut again,
        r.kind(),
        r.epoch(),
        r.lsn(),
        expect.chain,
        r.lsn() - u64::from(r.header.durable_gap.get()),
        r.body,
    );
    assert_eq!(chain, r.checksum());
    assert_eq!(
        &again[..],
        &buf[..r.encoded_len()],
        "decode/encode round trip"
    );
}

/// Input: the first byte picks where the bytes split into two segment files
/// (base LSNs 0 and the first segment's end); the rest is their contents.
/// Scanning and deciding must never panic, and a decided end lies where the
/// scans say records end.
pub fn recovery_scan(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let cut = if split == 0 {
        rest.len()
    } else {
        (rest.len() * split as usize / 256).min(rest.len())
    };
    let (first, second) = rest.split_at(cut);
    let mut scans = vec![scan_segment(first, FUZZ_LOG, 0, 0, |_| {})];
    if !second.is_empty() {
        let base = scans[0].end.lsn;
        scans.push(scan_segment(
            second,
            FUZZ_LOG,
            base,
            scans[0].end.epoch,
            |_| {},
        ));
    }
    for refetchable in [false, true] {
        if let Ok(decision) = decide(&scans, refetchable) {
            let ends: Vec<u64> = scans.iter().map(|s| s.end.lsn).collect();
            assert!(
                ends.contains(&decision.end.lsn) || decision.keep.is_empty(),
                "end {decision:?} not a scan end {ends:?}"
            );
        }
    }
}

/// Input: bytes a replication peer sent. A frame that decodes re-encodes to
/// the same bytes; so do the payloads of the kinds that have a layout.
pub fn frame_decode(data: &[u8]) {
    use crate::format::{
        Ack, FrameKind, Heartbeat, Hello, decode_fixed, decode_frame, encode_frame,
    };
    let Ok(Some(f)) = decode_frame(data, 1 << 16) else {
        return;
    };
    assert!(f.consumed <= data.len(), "consumed past the input");
    let mut again = Vec::new();
    encode_frame(&mut again, f.kind, f.shard, f.epoch, f.start_lsn, f.payload);
    assert_eq!(&again[..], &data[..f.consumed], "frame did not round-trip");
    match f.kind {
        FrameKind::Hello => {
            if let Ok(hello) = Hello::decode(f.payload) {
                assert_eq!(hello.encode(), f.payload, "hello did not round-trip");
            }
        }
        FrameKind::Ack => {
            let _ = decode_fixed::<Ack>(f.kind, f.payload);
        }
        FrameKind::Heartbeat => {
            let _ = decode_fixed::<Heartbeat>(f.kind, f.payload);
        }
        FrameKind::SnapshotEnd | FrameKind::Cut => {
            let _ = decode_fixed::<crate::format::SnapshotEnd>(f.kind, f.payload);
        }
        FrameKind::Records
        | FrameKind::Refuse
        | FrameKind::Resync
        | FrameKind::Snapshot
        | FrameKind::Report
        | FrameKind::Rewind => {}
    }
}

/// Input: bytes a client sent to the RESP listener. A parsed command's
/// argument ranges lie inside the bytes it consumed, and a [`Parser`] fed
/// the same bytes in pieces finds the same commands as one fed them whole.
///
/// [`Parser`]: crate::server::resp::Parser
pub fn resp_parse(data: &[u8]) {
    use crate::server::resp::{Limits, Parser, parse};
    let limits = Limits {
        bulk_bytes_max: 1 << 16,
        args_max: 1024,
        inline_bytes_max: 1 << 12,
    };
    let mut whole = Vec::new();
    let mut rest = data;
    let whole_end = loop {
        match parse(rest, &limits) {
            Ok(Some(frame)) => {
                assert!(
                    frame.consumed > 0 && frame.consumed <= rest.len(),
                    "bad consumed count"
                );
                for r in &frame.args {
                    assert!(
                        r.start <= r.end && r.end <= frame.consumed,
                        "argument outside the command"
                    );
                }
                let bytes = bytes::Bytes::copy_from_slice(&rest[..frame.consumed]);
                let consumed = frame.consumed;
                whole.push((frame.args.clone(), consumed));
                let _ = frame.arguments(&bytes);
                rest = &rest[consumed..];
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // The same bytes in pieces of a size taken from the input.
    let step = 1 + data.first().map_or(0, |b| usize::from(*b % 7));
    let mut parser = Parser::default();
    let (mut fed, mut start, mut pieces) = (0, 0, Vec::new());
    let pieces_end = 'feed: loop {
        loop {
            match parser.parse(&data[start..fed], &limits) {
                Ok(Some(frame)) => {
                    start += frame.consumed;
                    pieces.push((frame.args.clone(), frame.consumed));
                }
                Ok(None) => break,
                Err(e) => break 'feed Err(e),
            }
        }
        if fed == data.len() {
            break Ok(());
        }
        fed = (fed + step).min(data.len());
    };
    assert_eq!(
        pieces, whole,
        "fed in pieces, the parser found other commands"
    );
    assert_eq!(
        pieces_end.is_err(),
        whole_end.is_err(),
        "fed in pieces, the verdict changed"
    );
}
