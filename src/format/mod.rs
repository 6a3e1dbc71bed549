//! On-disk and on-wire formats: pure codecs, no I/O, no async.
//!
//! Every header is a `#[repr(C)]` zerocopy struct of little-endian fields with
//! its size pinned by a const assert; the doc comment of each field is the
//! format spec (FORMAT.md is its reader's guide). Decoders take bytes and
//! return a value, "incomplete", or a typed error saying where and what. They
//! never panic on input, which is what makes them fuzzable.

mod crc;
mod frame;
mod record;
mod segment;
mod snapshot;

pub use crc::{crc32c, crc32c_append};
pub use frame::{
    Ack, FRAME_HEADER_BYTES, FRAME_MAGIC, FrameError, FrameHeader, FrameKind, FrameRef,
    HELLO_HISTORY_MAX, Heartbeat, Hello, NODE_ID_MAX, RESYNC_MAY_REWIND, RESYNC_SNAPSHOT_ONLY,
    SnapshotEnd, decode_fixed, decode_frame, encode_frame, frame_header, frame_len,
    resync_may_rewind,
};
pub use record::{
    ByteSink, CHECKSUM_MASK, Decoded, Expect, RECORD_BODY_MAX, RECORD_HEADER_BYTES, RecordHeader,
    RecordKind, RecordRef, decode_record, encode_record, plausible_durable_floor_at,
    record_checksum,
};
pub use segment::{
    FORMAT_VERSION, LogId, SEGMENT_HEADER_BLOCK, SEGMENT_HEADER_BYTES, SEGMENT_MAGIC,
    SegmentHeader, parse_segment_file_name, segment_file_name,
};
pub use snapshot::{
    SNAPSHOT_BLOCK_BYTES, SNAPSHOT_MAGIC, SNAPSHOT_PAYLOAD_BYTES, SnapshotBlockHeader,
    SnapshotHeader, decode_snapshot_block, encode_snapshot_block, parse_snapshot_file_name,
    snapshot_file_name,
};

/// A decoding failure, with where (the LSN the record should have had) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("lsn {lsn}: unwritten (all-zero) space where a record should be")]
    Zeroed { lsn: u64 },
    #[error("lsn {lsn}: unknown record kind {kind}")]
    Kind { lsn: u64, kind: u8 },
    #[error("lsn {lsn}: record header carries lsn {got} (misplaced or stale)")]
    Misplaced { lsn: u64, got: u64 },
    #[error("lsn {lsn}: record length {length} over the limit")]
    Length { lsn: u64, length: u32 },
    #[error("lsn {lsn}: reserved header bytes are not zero")]
    Reserved { lsn: u64 },
    #[error("lsn {lsn}: epoch {got} is below the previous record's {previous}")]
    EpochRegressed { lsn: u64, previous: u64, got: u64 },
    #[error("lsn {lsn}: checksum mismatch (stored {expected:#010x}, computed {got:#010x})")]
    Checksum { lsn: u64, expected: u32, got: u32 },
    #[error("lsn {lsn}: record runs past the end of its segment")]
    Overrun { lsn: u64 },
    #[error("segment header: {why}")]
    SegmentHeader { why: &'static str },
    #[error("snapshot: {why}")]
    Snapshot { why: &'static str },
}
