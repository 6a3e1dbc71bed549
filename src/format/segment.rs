//! Segment header: the first 4 KiB block of every `{base_lsn:020}.wal` file.
//!
//! The header says which log the file belongs to (cluster, shard), where in
//! the logical stream it starts (`base_lsn`) and with which chain value, so a
//! segment can be verified on its own after the segments before it were
//! released. The header struct fills the first 64 bytes; the rest of the block
//! is zero and must stay zero.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::FormatError;
use super::record::CHECKSUM_MASK;

/// Bytes the segment header block occupies at the start of a segment file.
pub const SEGMENT_HEADER_BLOCK: usize = 4096;
/// Size of [`SegmentHeader`] in bytes.
pub const SEGMENT_HEADER_BYTES: usize = 64;
/// Identifies a tidewal WAL segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TIDEWAL\0";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The header at offset 0 of a segment file. Little-endian, unaligned.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SegmentHeader {
    /// [`SEGMENT_MAGIC`].
    pub magic: [u8; 8],
    /// [`FORMAT_VERSION`]; a reader refuses versions it does not know.
    pub version: U32,
    /// The shard whose log this is; a segment moved to another shard's
    /// directory is refused.
    pub shard: U32,
    /// The cluster this log belongs to, fixed when the data directory is
    /// created; refuses segments from another cluster.
    pub cluster_id: [u8; 16],
    /// LSN of the first record in this segment; also the file name.
    pub base_lsn: U64,
    /// Epoch of the writer that started this segment.
    pub epoch: U64,
    /// Checksum of the record before `base_lsn` (0 at LSN 0): the chain seed
    /// of this segment's first record.
    pub base_chain: U32,
    /// Reserved; must be zero.
    pub reserved: [u8; 8],
    /// CRC32C of bytes 0..60, XOR [`CHECKSUM_MASK`].
    pub checksum: U32,
}

const _: () = assert!(size_of::<SegmentHeader>() == SEGMENT_HEADER_BYTES);

/// Identity a segment must have to belong to a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogId {
    pub cluster_id: [u8; 16],
    pub shard: u32,
}

impl SegmentHeader {
    pub fn new(log: LogId, base_lsn: u64, epoch: u64, base_chain: u32) -> Self {
        let mut header = SegmentHeader {
            magic: SEGMENT_MAGIC,
            version: U32::new(FORMAT_VERSION),
            shard: U32::new(log.shard),
            cluster_id: log.cluster_id,
            base_lsn: U64::new(base_lsn),
            epoch: U64::new(epoch),
            base_chain: U32::new(base_chain),
            reserved: [0; 8],
            checksum: U32::new(0),
        };
        header.checksum = U32::new(header.compute_checksum());
        header
    }

    fn compute_checksum(&self) -> u32 {
        super::crc32c(&self.as_bytes()[..SEGMENT_HEADER_BYTES - 4]) ^ CHECKSUM_MASK
    }

    /// The whole header block, zero-padded to [`SEGMENT_HEADER_BLOCK`].
    pub fn to_block(&self) -> Vec<u8> {
        let mut block = vec![0u8; SEGMENT_HEADER_BLOCK];
        block[..SEGMENT_HEADER_BYTES].copy_from_slice(self.as_bytes());
        block
    }

    /// The log a header block claims to belong to, when its magic, version
    /// and checksum hold: lets a tool inspect a directory it knows nothing of.
    pub fn peek_log(block: &[u8]) -> Option<LogId> {
        let (header, _) = SegmentHeader::read_from_prefix(block).ok()?;
        let log = LogId {
            cluster_id: header.cluster_id,
            shard: header.shard.get(),
        };
        Self::decode(block, log).ok().map(|_| log)
    }

    /// Parses and verifies a header block that must belong to `log`.
    pub fn decode(block: &[u8], log: LogId) -> Result<SegmentHeader, FormatError> {
        let Some(block) = block.get(..SEGMENT_HEADER_BLOCK) else {
            return Err(FormatError::SegmentHeader {
                why: "shorter than the header block",
            });
        };
        if block.iter().all(|b| *b == 0) {
            return Err(FormatError::SegmentHeader {
                why: "header block is all zeros",
            });
        }
        let (header, _) =
            SegmentHeader::read_from_prefix(block).map_err(|_| FormatError::SegmentHeader {
                why: "shorter than the header",
            })?;
        let why = if header.magic != SEGMENT_MAGIC {
            Some("bad magic")
        } else if header.checksum.get() != header.compute_checksum() {
            Some("bad checksum")
        } else if header.version.get() != FORMAT_VERSION {
            Some("unknown format version")
        } else if header.reserved != [0; 8] || block[SEGMENT_HEADER_BYTES..].iter().any(|b| *b != 0)
        {
            Some("reserved bytes are not zero")
        } else if header.cluster_id != log.cluster_id {
            Some("belongs to another cluster")
        } else if header.shard.get() != log.shard {
            Some("belongs to another shard")
        } else {
            None
        };
        match why {
            Some(why) => Err(FormatError::SegmentHeader { why }),
            None => Ok(header),
        }
    }
}

/// The file name of the segment that starts at `base_lsn`.
pub fn segment_file_name(base_lsn: u64) -> String {
    format!("{base_lsn:020}.wal")
}

/// The base LSN a segment file name stands for, or `None` for other files.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    parse_lsn_digits(name.strip_suffix(".wal")?)
}

/// The LSN written as exactly 20 decimal digits in a file name.
pub(super) fn parse_lsn_digits(digits: &str) -> Option<u64> {
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: LogId = LogId {
        cluster_id: [7; 16],
        shard: 3,
    };

    #[test]
    fn header_round_trip() {
        let block = SegmentHeader::new(LOG, 4096, 2, 99).to_block();
        let header = SegmentHeader::decode(&block, LOG).unwrap();
        assert_eq!(header.base_lsn.get(), 4096);
        assert_eq!(header.base_chain.get(), 99);
        let other = LogId { shard: 4, ..LOG };
        assert!(SegmentHeader::decode(&block, other).is_err());
    }

    #[test]
    fn every_bit_flip_and_zeros_are_rejected() {
        assert!(SegmentHeader::decode(&[0; SEGMENT_HEADER_BLOCK], LOG).is_err());
        let block = SegmentHeader::new(LOG, 0, 1, 0).to_block();
        for byte in 0..SEGMENT_HEADER_BLOCK {
            let mut bad = block.clone();
            bad[byte] ^= 0x10;
            assert!(SegmentHeader::decode(&bad, LOG).is_err(), "byte {byte}");
        }
    }

    #[test]
    fn file_names() {
        assert_eq!(segment_file_name(42), "00000000000000000042.wal");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.wal"),
            Some(42)
        );
        assert_eq!(parse_segment_file_name("42.wal"), None);
        assert_eq!(parse_segment_file_name("00000000000000000042.tmp"), None);
    }
}
