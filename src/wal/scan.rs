//! Scanning one segment's bytes: pure, no I/O, shared by recovery, the reader
//! and `tidewal wal inspect`, and fuzzed.

use crate::format::{
    Decoded, Expect, FormatError, LogId, RECORD_HEADER_BYTES, RecordRef, SEGMENT_HEADER_BLOCK,
    SegmentHeader, decode_record, plausible_durable_floor_at,
};

/// How the scan of a segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// Unwritten (zero) space or the end of the file follows the last record,
    /// with nothing written after it.
    Clean,
    /// The header block does not validate.
    BadHeader { error: FormatError },
    /// The bytes at `offset` are not the record that should be there.
    BadRecord { offset: u64, error: FormatError },
}

/// What a segment holds, as far as it validates.
#[derive(Debug, Clone)]
pub struct SegmentScan {
    /// Base LSN from the file name.
    pub base_lsn: u64,
    /// The header, when it validates.
    pub header: Option<SegmentHeader>,
    /// The position after the last valid record (the segment's start if none).
    pub end: Expect,
    /// Number of valid records.
    pub records: u64,
    pub stop: ScanStop,
    /// Whether a record header bound to its place sits after the stop point
    /// and says the log was already durable past that point when it was
    /// staged: proof that the damage hit acknowledged data (corruption), not
    /// writes that were never synced (a torn tail).
    pub acked_after: bool,
    /// File offset just past the last non-zero byte.
    pub dirty_end: u64,
    /// The header block is what a rotation torn before its first sync
    /// leaves: all zeros (a fresh spare) or a sound header of an older life
    /// of the file (a recycled one). Any other invalid header is damage.
    pub header_unwritten: bool,
}

impl SegmentScan {
    /// File offset where the next record would go.
    pub fn end_offset(&self) -> u64 {
        offset_of(self.base_lsn, self.end.lsn)
    }
}

/// File offset of `lsn` in the segment that starts at `base_lsn`.
pub fn offset_of(base_lsn: u64, lsn: u64) -> u64 {
    SEGMENT_HEADER_BLOCK as u64 + (lsn - base_lsn)
}

/// Scans `bytes` (a whole segment file named for `base_lsn`), calling `visit`
/// for every valid record in order. `epoch_floor` is the epoch of the record
/// before the segment (0 for the first segment).
pub fn scan_segment(
    bytes: &[u8],
    log: LogId,
    base_lsn: u64,
    epoch_floor: u64,
    mut visit: impl FnMut(RecordRef<'_>),
) -> SegmentScan {
    let dirty_end = dirty_end(bytes);
    let mut scan = SegmentScan {
        base_lsn,
        header: None,
        end: Expect {
            lsn: base_lsn,
            chain: 0,
            epoch: epoch_floor,
        },
        records: 0,
        stop: ScanStop::Clean,
        acked_after: false,
        dirty_end,
        header_unwritten: false,
    };
    if base_lsn.checked_add(bytes.len() as u64).is_none() {
        scan.stop = ScanStop::BadHeader {
            error: FormatError::SegmentHeader {
                why: "base LSN too large for the file",
            },
        };
        return scan;
    }
    let header = match SegmentHeader::decode(bytes, log) {
        Ok(h) if h.base_lsn.get() != base_lsn => {
            scan.header_unwritten = h.base_lsn.get() < base_lsn;
            Err(FormatError::SegmentHeader {
                why: "base LSN differs from the file name",
            })
        }
        Err(e) => {
            let block = &bytes[..bytes.len().min(SEGMENT_HEADER_BLOCK)];
            scan.header_unwritten =
                block.len() == SEGMENT_HEADER_BLOCK && block.iter().all(|b| *b == 0);
            Err(e)
        }
        ok => ok,
    };
    let header = match header {
        Ok(h) => h,
        Err(error) => {
            scan.stop = ScanStop::BadHeader { error };
            scan.acked_after = acked_between(
                bytes,
                base_lsn,
                SEGMENT_HEADER_BLOCK as u64,
                dirty_end,
                base_lsn,
            );
            return scan;
        }
    };
    scan.header = Some(header);
    scan.end.chain = header.base_chain.get();
    loop {
        let offset = offset_of(base_lsn, scan.end.lsn);
        let rest = bytes.get(offset as usize..).unwrap_or_default();
        if rest.len() < RECORD_HEADER_BYTES && rest.iter().all(|b| *b == 0) {
            return scan; // the segment is full: no room for another header
        }
        let error = match decode_record(rest, scan.end) {
            Ok(Decoded::Record(record)) => {
                visit(record);
                scan.records += 1;
                scan.end = record.next();
                continue;
            }
            Ok(Decoded::Incomplete { .. }) => FormatError::Overrun { lsn: scan.end.lsn },
            Err(error) => error,
        };
        scan.acked_after = acked_between(bytes, base_lsn, offset + 1, dirty_end, scan.end.lsn);
        let zeroed = matches!(error, FormatError::Zeroed { .. });
        if !zeroed || scan.acked_after {
            scan.stop = ScanStop::BadRecord { offset, error };
        }
        return scan;
    }
}

/// File offset just past the last non-zero byte.
fn dirty_end(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |i| i as u64 + 1)
}

/// Whether any offset in `[from, to)` holds a record header bound to the LSN
/// of that offset, staged when the log was durable past `bad_lsn`.
fn acked_between(bytes: &[u8], base_lsn: u64, from: u64, to: u64, bad_lsn: u64) -> bool {
    let from = from.max(SEGMENT_HEADER_BLOCK as u64);
    (from..to).any(|offset| {
        let lsn = base_lsn + (offset - SEGMENT_HEADER_BLOCK as u64);
        bytes
            .get(offset as usize..)
            .filter(|b| b.len() >= RECORD_HEADER_BYTES)
            .and_then(|b| plausible_durable_floor_at(b, lsn))
            .is_some_and(|floor| floor > bad_lsn)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: LogId = LogId {
        cluster_id: [1; 16],
        shard: 0,
    };

    #[test]
    fn huge_base_lsns_do_not_overflow() {
        let mut bytes = vec![0u8; 8192];
        bytes[5000] = 1;
        for base in [u64::MAX, u64::MAX - 4096, u64::MAX - 8192] {
            let scan = scan_segment(&bytes, LOG, base, 0, |_| {});
            assert!(matches!(scan.stop, ScanStop::BadHeader { .. }));
        }
    }
}
