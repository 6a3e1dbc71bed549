//! Snapshot file: the state of a shard at a WAL position, in checksummed
//! blocks.
//!
//! ```text
//! offset 0      4096                       4096 + n * 64 KiB
//!        | header | block | block | ... | block |
//! ```
//!
//! Each 64 KiB block is a 16-byte [`SnapshotBlockHeader`] and up to
//! 65,520 bytes of the entry stream; entries (`key_len u32, value_len u32,
//! key, value`, little-endian) may span blocks. Blocks carry their index, so
//! a block from another place or another snapshot fails. The header is
//! written last, then the file is synced and renamed into place: a snapshot
//! under its final name was complete when written.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::record::CHECKSUM_MASK;
use super::{FormatError, LogId};

/// Identifies a tidewal snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"TWSNAP\0\0";
/// Bytes of a snapshot block, header included.
pub const SNAPSHOT_BLOCK_BYTES: usize = 64 << 10;
/// Entry-stream bytes one block carries.
pub const SNAPSHOT_PAYLOAD_BYTES: usize = SNAPSHOT_BLOCK_BYTES - size_of::<SnapshotBlockHeader>();

/// The first 4 KiB of a snapshot file (the struct, then zeros).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SnapshotHeader {
    /// [`SNAPSHOT_MAGIC`].
    pub magic: [u8; 8],
    /// Format version, 1.
    pub version: U32,
    /// Shard whose state this is.
    pub shard: U32,
    /// Cluster the shard belongs to.
    pub cluster_id: [u8; 16],
    /// WAL position the state corresponds to: every record below `lsn` is
    /// in it, none at or above. Replay starts here.
    pub lsn: U64,
    /// Epoch of the record before `lsn` (the replay's epoch floor).
    pub epoch: U64,
    /// Checksum of the record before `lsn`: the chain seed of replay.
    pub chain: U32,
    /// Reserved; zero.
    pub reserved: U32,
    /// Number of entries in the stream.
    pub entries: U64,
    /// Bytes of the entry stream.
    pub stream_bytes: U64,
    /// Reserved; zero.
    pub reserved2: [u8; 4],
    /// CRC32C of bytes 0..76, XOR the mask.
    pub checksum: U32,
}

const _: () = assert!(size_of::<SnapshotHeader>() == 80);

/// The header of each 64 KiB block.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SnapshotBlockHeader {
    /// Position of the block in the file, from 0.
    pub index: U64,
    /// Stream bytes in this block (all but the last block are full).
    pub length: U32,
    /// CRC32C of bytes 0..12 of this header and the payload, XOR the mask.
    pub checksum: U32,
}

const _: () = assert!(size_of::<SnapshotBlockHeader>() == 16);

impl SnapshotHeader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        log: LogId,
        lsn: u64,
        epoch: u64,
        chain: u32,
        entries: u64,
        stream_bytes: u64,
    ) -> Self {
        let mut h = SnapshotHeader {
            magic: SNAPSHOT_MAGIC,
            version: U32::new(1),
            shard: U32::new(log.shard),
            cluster_id: log.cluster_id,
            lsn: U64::new(lsn),
            epoch: U64::new(epoch),
            chain: U32::new(chain),
            reserved: U32::new(0),
            entries: U64::new(entries),
            stream_bytes: U64::new(stream_bytes),
            reserved2: [0; 4],
            checksum: U32::new(0),
        };
        h.checksum = U32::new(h.compute_checksum());
        h
    }

    fn compute_checksum(&self) -> u32 {
        super::crc32c(&self.as_bytes()[..size_of::<Self>() - 4]) ^ CHECKSUM_MASK
    }

    /// Parses and verifies a header that must belong to `log`.
    pub fn decode(bytes: &[u8], log: LogId) -> Result<Self, FormatError> {
        let bad = |why| FormatError::Snapshot { why };
        let (h, _) = SnapshotHeader::read_from_prefix(bytes)
            .map_err(|_| bad("snapshot shorter than its header"))?;
        if h.magic != SNAPSHOT_MAGIC || h.checksum.get() != h.compute_checksum() {
            return Err(bad("snapshot header: bad magic or checksum"));
        }
        if h.version.get() != 1 || h.reserved.get() != 0 || h.reserved2 != [0; 4] {
            return Err(bad(
                "snapshot header: unknown version or reserved bytes set",
            ));
        }
        if h.cluster_id != log.cluster_id || h.shard.get() != log.shard {
            return Err(bad("snapshot of another cluster or shard"));
        }
        Ok(h)
    }
}

/// Appends block `index` carrying `payload` (at most
/// [`SNAPSHOT_PAYLOAD_BYTES`]) to `out`, zero-padded to a full block.
pub fn encode_snapshot_block(out: &mut Vec<u8>, index: u64, payload: &[u8]) {
    assert!(payload.len() <= SNAPSHOT_PAYLOAD_BYTES);
    let mut h = SnapshotBlockHeader {
        index: U64::new(index),
        length: U32::new(payload.len() as u32),
        checksum: U32::new(0),
    };
    let crc = super::crc32c_append(super::crc32c(&h.as_bytes()[..12]), payload) ^ CHECKSUM_MASK;
    h.checksum = U32::new(crc);
    let start = out.len();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(payload);
    out.resize(start + SNAPSHOT_BLOCK_BYTES, 0);
}

/// Verifies block `index` and returns its payload.
pub fn decode_snapshot_block(block: &[u8], index: u64) -> Result<&[u8], FormatError> {
    let bad = |why| FormatError::Snapshot { why };
    let (h, rest) =
        SnapshotBlockHeader::ref_from_prefix(block).map_err(|_| bad("snapshot block truncated"))?;
    let len = h.length.get() as usize;
    let payload = rest
        .get(..len)
        .filter(|_| len <= SNAPSHOT_PAYLOAD_BYTES)
        .ok_or(bad("snapshot block length out of range"))?;
    let crc = super::crc32c_append(super::crc32c(&h.as_bytes()[..12]), payload) ^ CHECKSUM_MASK;
    if crc != h.checksum.get() {
        return Err(bad("snapshot block checksum mismatch"));
    }
    if h.index.get() != index {
        return Err(bad("snapshot block out of place"));
    }
    Ok(payload)
}

/// File name of the snapshot at `lsn`.
pub fn snapshot_file_name(lsn: u64) -> String {
    format!("snapshot-{lsn:020}.snap")
}

/// The LSN a snapshot file name stands for.
pub fn parse_snapshot_file_name(name: &str) -> Option<u64> {
    super::segment::parse_lsn_digits(name.strip_prefix("snapshot-")?.strip_suffix(".snap")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: LogId = LogId {
        cluster_id: [3; 16],
        shard: 1,
    };

    #[test]
    fn header_and_blocks_round_trip_and_reject_damage() {
        let h = SnapshotHeader::new(LOG, 4096, 2, 7, 10, 100);
        let bytes = h.as_bytes().to_vec();
        assert_eq!(SnapshotHeader::decode(&bytes, LOG).unwrap().lsn.get(), 4096);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(SnapshotHeader::decode(&bad, LOG).is_err(), "byte {i}");
        }
        let mut out = Vec::new();
        encode_snapshot_block(&mut out, 3, b"payload");
        assert_eq!(out.len(), SNAPSHOT_BLOCK_BYTES);
        assert_eq!(decode_snapshot_block(&out, 3).unwrap(), b"payload");
        assert!(decode_snapshot_block(&out, 4).is_err());
        // Header and payload are covered; the zero padding after them is not read.
        for i in 0..16 + 7 {
            let mut bad = out.clone();
            bad[i] ^= 0x40;
            assert!(decode_snapshot_block(&bad, 3).is_err(), "byte {i}");
        }
        assert_eq!(parse_snapshot_file_name(&snapshot_file_name(99)), Some(99));
    }
}
