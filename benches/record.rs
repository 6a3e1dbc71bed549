//! The record codec on its own: what encoding a record into the log's
//! staging buffer and decoding it back cost per record, for 100-byte, 4 KiB
//! and 64 KiB bodies. Every durable append pays the encode on the log's
//! executor; recovery, `wal inspect` and every replica pay the decode.
//!
//! `cargo bench --bench record`. Figures are medians of 5 rounds of about
//! TIDEWAL_BENCH_BYTES (default 256 MiB) of records each, in ns per record
//! and GB/s of record bytes.

mod common;

use std::time::Instant;

use common::{env, median};
use tidewal::format::{
    Decoded, Expect, RECORD_HEADER_BYTES, RecordKind, decode_record, encode_record,
};
use tidewal::io::AlignedBuf;

fn main() {
    let bytes = env("TIDEWAL_BENCH_BYTES", 256 << 20) as usize;
    println!(
        "{:>10} {:>12} {:>10} {:>12} {:>10}",
        "body", "encode ns", "GB/s", "decode ns", "GB/s"
    );
    for body_len in [100usize, 4096, 65536] {
        let body: Vec<u8> = (0..body_len).map(|i| (i * 31 + 7) as u8).collect();
        let size = RECORD_HEADER_BYTES + body_len;
        // A batch's worth of records per buffer, as the log stages them.
        let per_batch = ((1 << 20) / size).max(1);
        let batches = (bytes / (per_batch * size)).max(1);
        let records = (batches * per_batch) as f64;
        let mut buf = AlignedBuf::with_capacity(per_batch * size);
        let (mut encode, mut decode) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t = Instant::now();
            let (mut chain, mut last_start) = (0, 0);
            for b in 0..batches {
                buf.clear();
                last_start = chain;
                for i in 0..per_batch {
                    let lsn = ((b * per_batch + i) * size) as u64;
                    chain = encode_record(&mut buf, RecordKind::Data, 1, lsn, chain, lsn, &body);
                }
            }
            encode.push(t.elapsed().as_nanos() as f64 / records);
            // Decode the last batch over and over, as a reader walks a log.
            let start = Expect {
                lsn: ((batches - 1) * per_batch * size) as u64,
                chain: last_start,
                epoch: 1,
            };
            let t = Instant::now();
            let mut decoded = 0u64;
            for _ in 0..batches {
                let (mut at, mut next) = (0, start);
                while let Ok(Decoded::Record(r)) = decode_record(&buf[at..], next) {
                    at += r.encoded_len();
                    next = r.next();
                    decoded += 1;
                }
            }
            assert_eq!(decoded, records as u64, "every record decodes");
            decode.push(t.elapsed().as_nanos() as f64 / decoded.max(1) as f64);
        }
        let (e, d) = (median(encode), median(decode));
        println!(
            "{body_len:>10} {e:>12.1} {:>10.1} {d:>12.1} {:>10.1}",
            size as f64 / e,
            size as f64 / d
        );
    }
}
