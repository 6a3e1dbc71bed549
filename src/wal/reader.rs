//! Reading durable records by position.
//!
//! A position is an [`Expect`]: the LSN of a record and the chain value before
//! it, so every record read is verified against the history that led to it.
//! Bodies are slices of one shared buffer per read ([`bytes::Bytes`]).

use bytes::Bytes;

use crate::format::{
    Decoded, Expect, RECORD_HEADER_BYTES, RecordKind, decode_record, segment_file_name,
};
use crate::io::{Storage, StorageFile};

use super::WalError;
use super::scan::offset_of;
use super::segment::Segments;

/// One record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    pub lsn: u64,
    pub epoch: u64,
    pub kind: RecordKind,
    /// The record's chained checksum.
    pub checksum: u32,
    pub body: Bytes,
    /// The whole record, header and body, exactly as on disk: what a
    /// replication upstream forwards (sharing the read buffer, no copy).
    pub encoded: Bytes,
}

impl OwnedRecord {
    /// The record `r`, decoded at offset `at` of `bytes`, sharing them.
    pub(super) fn at(r: &crate::format::RecordRef<'_>, bytes: &Bytes, at: usize) -> Self {
        let n = r.encoded_len();
        OwnedRecord {
            lsn: r.lsn(),
            epoch: r.epoch(),
            kind: r.kind(),
            checksum: r.checksum(),
            body: bytes.slice(at + RECORD_HEADER_BYTES..at + n),
            encoded: bytes.slice(at..at + n),
        }
    }
}

/// Records read in order, and the position after the last of them.
#[derive(Debug, Clone)]
pub struct ReadBatch {
    pub records: Vec<OwnedRecord>,
    /// Every record of the batch, contiguous, exactly as on disk (one
    /// shared buffer: what a replication upstream sends, uncopied).
    pub encoded: Bytes,
    pub next: Expect,
}

/// Reads durable records (below `durable_lsn`) starting at `from`, about
/// `max_bytes` of them, at least one if there is one, never crossing a
/// segment.
pub(super) async fn read<S: Storage>(
    segments: &Segments<S>,
    mut from: Expect,
    durable_lsn: u64,
    max_bytes: usize,
) -> Result<ReadBatch, WalError> {
    let mut records = Vec::new();
    if from.lsn >= durable_lsn {
        return Ok(ReadBatch {
            records,
            encoded: Bytes::new(),
            next: from,
        });
    }
    let mut seg = segments.locate(from.lsn).ok_or(WalError::Position {
        lsn: from.lsn,
        why: "released or never written",
    })?;
    if from.lsn >= seg.end_lsn {
        // At the end of one segment: the next one starts here, same chain.
        let Some((next_base, next_chain)) = seg.next.filter(|(b, _)| *b == from.lsn) else {
            return Err(WalError::Position {
                lsn: from.lsn,
                why: "past the end of its segment",
            });
        };
        if next_chain != from.chain {
            return Err(WalError::Position {
                lsn: from.lsn,
                why: "chain differs from the log's",
            });
        }
        seg = segments.locate(next_base).expect("just found");
    }
    let (base, file) = (seg.base_lsn, seg.file);
    let end = seg.end_lsn.min(durable_lsn);
    let mut want = max_bytes.max(RECORD_HEADER_BYTES) as u64;
    loop {
        let len = want.min(end - from.lsn) as usize;
        let bytes = Bytes::from(file.read_at(offset_of(base, from.lsn), len).await?);
        if bytes.len() < len {
            // Durable bytes are missing: the file was truncated behind the log.
            return Err(WalError::BadRecord {
                segment: segment_file_name(base),
                offset: offset_of(base, from.lsn) + bytes.len() as u64,
                error: crate::format::FormatError::Overrun { lsn: from.lsn },
            });
        }
        let mut at = 0;
        let batch = |records, at: usize, next| ReadBatch {
            records,
            encoded: bytes.slice(..at),
            next,
        };
        while at < bytes.len() {
            match decode_record(&bytes[at..], from) {
                Ok(Decoded::Record(r)) => {
                    records.push(OwnedRecord::at(&r, &bytes, at));
                    from = r.next();
                    at += r.encoded_len();
                }
                Ok(Decoded::Incomplete { .. })
                    if records.is_empty() && len as u64 >= end - from.lsn =>
                {
                    return Err(WalError::BadRecord {
                        segment: segment_file_name(base),
                        offset: offset_of(base, from.lsn),
                        error: crate::format::FormatError::Overrun { lsn: from.lsn },
                    });
                }
                Ok(Decoded::Incomplete { needed }) if records.is_empty() => {
                    want = needed as u64;
                    break;
                }
                Ok(Decoded::Incomplete { .. }) => return Ok(batch(records, at, from)),
                Err(error) => {
                    return Err(WalError::BadRecord {
                        segment: segment_file_name(base),
                        offset: offset_of(base, from.lsn),
                        error,
                    });
                }
            }
        }
        if !records.is_empty() || from.lsn >= end {
            return Ok(batch(records, at, from));
        }
    }
}
