//! Replication frames: what travels between an upstream and a downstream.
//!
//! A frame is a 40-byte [`FrameHeader`] and a payload. The header carries
//! the sender's epoch (a receiver that has seen a higher one refuses the
//! frame), the shard, and for record frames the LSN of the first record;
//! its own CRC32C covers it, so a length is trusted only once the header
//! verifies, and the payload has a CRC32C of its own. A `Records` payload is
//! WAL record bytes exactly as they sit on disk (one encode for disk and
//! wire): the receiver verifies each record and the chain on top of the
//! frame checksum. The other kinds' payloads are fixed little-endian structs
//! below ([`Hello`] with its epoch history, [`Ack`], [`Heartbeat`]).
//!
//! Decoding never panics and never allocates from a length before checking
//! it against the caller's limit.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of [`FrameHeader`].
pub const FRAME_HEADER_BYTES: usize = 40;

/// `TWF1`, little-endian: the first bytes of every frame.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"TWF1");

/// `start_lsn` of a `Resync` from a downstream that understands `Rewind`
/// frames and may be rewound. A downstream that predates them sends 0, so
/// it is never sent a frame kind it does not know.
pub const RESYNC_MAY_REWIND: u64 = 2;
/// `start_lsn` of a `Resync` that asks for a snapshot, whatever the
/// position (the downstream could not rewind).
pub const RESYNC_SNAPSHOT_ONLY: u64 = 1;

/// Whether a `Resync` with this `start_lsn` lets the upstream answer with a
/// `Rewind` (only [`RESYNC_MAY_REWIND`] does).
pub fn resync_may_rewind(start_lsn: u64) -> bool {
    start_lsn == RESYNC_MAY_REWIND
}

/// The header of every replication frame. Little-endian, unaligned.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FrameHeader {
    /// [`FRAME_MAGIC`].
    pub magic: U32,
    /// What the payload is, see [`FrameKind`]. Zero is invalid.
    pub kind: u8,
    /// Reserved; zero in version 1.
    pub flags: u8,
    /// Reserved; zero.
    pub reserved: U16,
    /// The shard the frame is about.
    pub shard: U32,
    /// Payload bytes after the header.
    pub length: U32,
    /// The sender's epoch. A receiver that has seen a higher epoch refuses
    /// the frame (a deposed primary cannot complete a replicated write).
    pub epoch: U64,
    /// `Records`: the LSN of the first record in the payload. Other kinds:
    /// zero.
    pub start_lsn: U64,
    /// CRC32C of the payload, XOR [`super::CHECKSUM_MASK`].
    pub payload_crc: U32,
    /// CRC32C of bytes 0..36 of this header, XOR [`super::CHECKSUM_MASK`].
    pub header_crc: U32,
}

const _: () = assert!(size_of::<FrameHeader>() == FRAME_HEADER_BYTES);

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Downstream → upstream: who it is and where its log ends ([`Hello`]).
    Hello = 1,
    /// Upstream → downstream: WAL record bytes as on disk.
    Records = 2,
    /// Downstream → upstream: written / flushed / applied LSNs ([`Ack`]).
    Ack = 3,
    /// Upstream → downstream: the head of the log and the time ([`Heartbeat`]).
    Heartbeat = 4,
    /// Either way: a refusal, the payload a UTF-8 reason; the connection
    /// ends after it.
    Refuse = 5,
    /// Downstream → upstream, before its Hellos: re-sync this shard (asked
    /// for by an operator); no payload. With `start_lsn`
    /// [`RESYNC_MAY_REWIND`] the upstream may answer with a
    /// [`FrameKind::Rewind`] when the epoch histories locate where the logs
    /// part; with any other value it sends its newest snapshot whatever the
    /// position.
    Resync = 6,
    /// Upstream → downstream: a piece of a snapshot file; `start_lsn` is
    /// the piece's byte offset in the file.
    Snapshot = 7,
    /// Upstream → downstream: the snapshot is complete ([`SnapshotEnd`]);
    /// records from its position follow.
    SnapshotEnd = 8,
    /// Downstream → upstream: its own downstreams, as UTF-8 JSON (what its
    /// status page says of them), so cascaded replicas appear under their
    /// upstream's upstream.
    Report = 9,
    /// Upstream → downstream, answering a `Resync` that allows it: the logs part
    /// at `start_lsn` (where the epoch histories differ, a record boundary
    /// of both). The downstream rewinds its log to it, keeping the records
    /// past it aside, and says Hello again from there; only the divergent
    /// suffix is then sent. No payload; the stream ends after it.
    Rewind = 10,
    /// Upstream → backup client (`TIDEWAL.BACKUP`): shard `shard`'s
    /// records from its snapshot's position up to the backup's consistent
    /// cut were sent (as `Records` frames); the payload, laid out as
    /// [`SnapshotEnd`], is the cut (`lsn`, `chain`, `epoch`) and the bytes
    /// of records sent (`file_bytes`); `reserved` is 0 for the primary's
    /// consistent cut, 1 when the node could not ask its primary and its
    /// own heads stand in.
    Cut = 11,
}

impl FrameKind {
    pub fn from_u8(kind: u8) -> Option<Self> {
        match kind {
            1 => Some(Self::Hello),
            2 => Some(Self::Records),
            3 => Some(Self::Ack),
            4 => Some(Self::Heartbeat),
            5 => Some(Self::Refuse),
            6 => Some(Self::Resync),
            7 => Some(Self::Snapshot),
            8 => Some(Self::SnapshotEnd),
            9 => Some(Self::Report),
            10 => Some(Self::Rewind),
            11 => Some(Self::Cut),
            _ => None,
        }
    }
}

/// A frame that cannot be accepted, with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a tidewal frame (magic {0:#010x})")]
    Magic(u32),
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("reserved frame header bytes are not zero")]
    Reserved,
    #[error("frame payload of {length} bytes is over the limit of {max}")]
    Length { length: u32, max: usize },
    #[error("frame payload checksum mismatch")]
    PayloadChecksum,
    #[error("{kind:?} payload is malformed: {why}")]
    Payload { kind: FrameKind, why: &'static str },
}

fn masked_crc(bytes: &[u8]) -> u32 {
    super::crc32c(bytes) ^ super::CHECKSUM_MASK
}

/// Appends one frame (header and payload) to `out`.
pub fn encode_frame(
    out: &mut Vec<u8>,
    kind: FrameKind,
    shard: u32,
    epoch: u64,
    start_lsn: u64,
    payload: &[u8],
) {
    out.extend_from_slice(frame_header(kind, shard, epoch, start_lsn, payload).as_bytes());
    out.extend_from_slice(payload);
}

/// The header of a frame carrying `payload`, for a sender that writes the
/// payload from where it already is rather than copying it behind the
/// header.
pub fn frame_header(
    kind: FrameKind,
    shard: u32,
    epoch: u64,
    start_lsn: u64,
    payload: &[u8],
) -> FrameHeader {
    let mut header = FrameHeader {
        magic: FRAME_MAGIC.into(),
        kind: kind as u8,
        flags: 0,
        reserved: 0.into(),
        shard: shard.into(),
        length: (payload.len() as u32).into(),
        epoch: epoch.into(),
        start_lsn: start_lsn.into(),
        payload_crc: masked_crc(payload).into(),
        header_crc: 0.into(),
    };
    header.header_crc = masked_crc(&header.as_bytes()[..FRAME_HEADER_BYTES - 4]).into();
    header
}

/// One decoded frame: its header and its payload bytes.
#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    pub kind: FrameKind,
    pub shard: u32,
    pub epoch: u64,
    pub start_lsn: u64,
    pub payload: &'a [u8],
    /// Bytes the frame used, header included.
    pub consumed: usize,
}

/// The whole length, header included, of the frame `input` begins with,
/// once its header has arrived (`None` before): how much room a reader
/// needs for it. It checks nothing; use it after [`decode_frame`] said the
/// frame is incomplete, which it says only of a header it verified, with a
/// length it accepts.
pub fn frame_len(input: &[u8]) -> Option<usize> {
    let (header, _) = FrameHeader::read_from_prefix(input).ok()?;
    Some(FRAME_HEADER_BYTES + header.length.get() as usize)
}

/// Decodes the frame at the front of `input`: `Ok(None)` when more bytes
/// are needed. The header is verified before its length is trusted, and a
/// length over `payload_max` is refused before waiting for the payload.
pub fn decode_frame(input: &[u8], payload_max: usize) -> Result<Option<FrameRef<'_>>, FrameError> {
    let Ok((header, rest)) = FrameHeader::read_from_prefix(input) else {
        // Garbage is refused as soon as its first bytes show it.
        if input.len() >= 4 {
            let magic = u32::from_le_bytes([input[0], input[1], input[2], input[3]]);
            if magic != FRAME_MAGIC {
                return Err(FrameError::Magic(magic));
            }
        }
        return Ok(None);
    };
    if header.magic.get() != FRAME_MAGIC {
        return Err(FrameError::Magic(header.magic.get()));
    }
    if masked_crc(&input[..FRAME_HEADER_BYTES - 4]) != header.header_crc.get() {
        return Err(FrameError::HeaderChecksum);
    }
    let kind = FrameKind::from_u8(header.kind).ok_or(FrameError::Kind(header.kind))?;
    if header.flags != 0 || header.reserved.get() != 0 {
        return Err(FrameError::Reserved);
    }
    let length = header.length.get();
    if length as usize > payload_max {
        return Err(FrameError::Length {
            length,
            max: payload_max,
        });
    }
    let Some(payload) = rest.get(..length as usize) else {
        return Ok(None);
    };
    if masked_crc(payload) != header.payload_crc.get() {
        return Err(FrameError::PayloadChecksum);
    }
    Ok(Some(FrameRef {
        kind,
        shard: header.shard.get(),
        epoch: header.epoch.get(),
        start_lsn: header.start_lsn.get(),
        payload,
        consumed: FRAME_HEADER_BYTES + length as usize,
    }))
}

/// Payload of a `Hello`: the downstream's identity and where its log of
/// this shard ends, with the tail of its epoch history so the upstream can
/// find where the two histories part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub cluster_id: [u8; 16],
    /// The downstream's shard count: keys map to shards by it, so both ends
    /// must have the same.
    pub shard_count: u32,
    /// The end of the downstream's log: the next LSN it expects.
    pub lsn: u64,
    /// The chain value at `lsn` (the last record's checksum).
    pub chain: u32,
    /// `(epoch, start_lsn)` pairs, oldest first: where each epoch began.
    pub history: Vec<(u64, u64)>,
    /// The downstream's node id, UTF-8.
    pub node_id: String,
}

/// Most epoch-history entries a `Hello` carries.
pub const HELLO_HISTORY_MAX: usize = 1024;
/// Longest node id.
pub const NODE_ID_MAX: usize = 255;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloFixed {
    cluster_id: [u8; 16],
    shard_count: U32,
    lsn: U64,
    chain: U32,
    history_len: U16,
    node_id_len: U16,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let history = &self.history[..self.history.len().min(HELLO_HISTORY_MAX)];
        let id = &self.node_id.as_bytes()[..self.node_id.len().min(NODE_ID_MAX)];
        let fixed = HelloFixed {
            cluster_id: self.cluster_id,
            shard_count: self.shard_count.into(),
            lsn: self.lsn.into(),
            chain: self.chain.into(),
            history_len: (history.len() as u16).into(),
            node_id_len: (id.len() as u16).into(),
        };
        let mut out = fixed.as_bytes().to_vec();
        for (epoch, start) in history {
            out.extend_from_slice(&epoch.to_le_bytes());
            out.extend_from_slice(&start.to_le_bytes());
        }
        out.extend_from_slice(id);
        out
    }

    pub fn decode(payload: &[u8]) -> Result<Hello, FrameError> {
        let bad = |why| FrameError::Payload {
            kind: FrameKind::Hello,
            why,
        };
        let (fixed, rest) = HelloFixed::read_from_prefix(payload).map_err(|_| bad("short"))?;
        let (n, id_len) = (
            fixed.history_len.get() as usize,
            fixed.node_id_len.get() as usize,
        );
        if n > HELLO_HISTORY_MAX || id_len > NODE_ID_MAX {
            return Err(bad("history or node id over its limit"));
        }
        if rest.len() != n * 16 + id_len {
            return Err(bad("length does not match its counts"));
        }
        let (entries, id) = rest.split_at(n * 16);
        let history = entries
            .chunks_exact(16)
            .map(|e| {
                let (a, b) = e.split_at(8);
                (
                    u64::from_le_bytes(a.try_into().unwrap_or_default()),
                    u64::from_le_bytes(b.try_into().unwrap_or_default()),
                )
            })
            .collect::<Vec<_>>();
        if history
            .windows(2)
            .any(|w| w[1].0 <= w[0].0 || w[1].1 < w[0].1)
        {
            return Err(bad("epoch history is not increasing"));
        }
        let node_id = std::str::from_utf8(id)
            .map_err(|_| bad("node id is not UTF-8"))?
            .to_string();
        Ok(Hello {
            cluster_id: fixed.cluster_id,
            shard_count: fixed.shard_count.get(),
            lsn: fixed.lsn.get(),
            chain: fixed.chain.get(),
            history,
            node_id,
        })
    }
}

/// Payload of an `Ack`: how far the downstream has the log.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Ack {
    /// Received and staged in its WAL, up to (not including) this LSN.
    pub written: U64,
    /// Durable in its WAL.
    pub flushed: U64,
    /// Applied to its state (visible to its readers).
    pub applied: U64,
}

/// Payload of a `Heartbeat`: the upstream's head and clock, so a
/// downstream's lag is right when nothing is written.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Heartbeat {
    /// Where the upstream's next record goes.
    pub head_lsn: U64,
    /// Everything below is durable on the upstream.
    pub durable_lsn: U64,
    /// The upstream's wall clock, microseconds since the Unix epoch.
    pub unix_micros: U64,
}

/// Payload of a `SnapshotEnd`: the whole file's length and the log
/// position the snapshot stands for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct SnapshotEnd {
    /// Bytes of the snapshot file sent.
    pub file_bytes: U64,
    /// The LSN the snapshot ends at (where the records that follow start).
    pub lsn: U64,
    /// Epoch of the record before `lsn`.
    pub epoch: U64,
    /// Chain value before `lsn`.
    pub chain: U32,
    /// Zero.
    pub reserved: U32,
}

/// Reads a fixed-size payload struct, refusing any other length.
pub fn decode_fixed<T: FromBytes + KnownLayout + Immutable + Unaligned + Copy>(
    kind: FrameKind,
    payload: &[u8],
) -> Result<T, FrameError> {
    T::read_from_bytes(payload).map_err(|_| FrameError::Payload {
        kind,
        why: "wrong length",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(&mut out, kind, 3, 7, 4096, payload);
        out
    }

    /// A frame's length is known from its header on: at every cut of an
    /// incomplete frame past the header, `frame_len` names the whole.
    #[test]
    fn a_frames_length_is_known_once_its_header_is_in() {
        let whole = frame(FrameKind::Records, &[9u8; 1000]);
        for cut in 0..whole.len() {
            let part = &whole[..cut];
            assert!(decode_frame(part, 4096).unwrap().is_none(), "cut {cut}");
            let expected = (cut >= FRAME_HEADER_BYTES).then_some(whole.len());
            assert_eq!(frame_len(part), expected, "cut {cut}");
        }
        assert_eq!(frame_len(&whole), Some(whole.len()));
    }

    /// A downstream that predates Rewind frames sends Resync with 0: it
    /// must get a snapshot, never a frame kind it does not know.
    #[test]
    fn only_a_resync_that_says_so_may_be_answered_with_a_rewind() {
        assert!(!resync_may_rewind(0));
        assert!(!resync_may_rewind(RESYNC_SNAPSHOT_ONLY));
        assert!(resync_may_rewind(RESYNC_MAY_REWIND));
        assert!(!resync_may_rewind(u64::MAX));
    }

    #[test]
    fn round_trip_and_incomplete() {
        let ack = Ack {
            written: 10.into(),
            flushed: 8.into(),
            applied: 5.into(),
        };
        let bytes = frame(FrameKind::Ack, ack.as_bytes());
        for cut in 0..bytes.len() {
            assert!(
                decode_frame(&bytes[..cut], 1 << 20).unwrap().is_none(),
                "cut {cut}"
            );
        }
        let f = decode_frame(&bytes, 1 << 20).unwrap().unwrap();
        assert_eq!(
            (f.kind, f.shard, f.epoch, f.start_lsn, f.consumed),
            (FrameKind::Ack, 3, 7, 4096, bytes.len())
        );
        assert_eq!(decode_fixed::<Ack>(FrameKind::Ack, f.payload).unwrap(), ack);

        let hello = Hello {
            cluster_id: [9; 16],
            shard_count: 4,
            lsn: 12345,
            chain: 0xdead_beef,
            history: vec![(1, 0), (2, 4000), (5, 9000)],
            node_id: "replica-a".into(),
        };
        let bytes = frame(FrameKind::Hello, &hello.encode());
        let f = decode_frame(&bytes, 1 << 20).unwrap().unwrap();
        assert_eq!(Hello::decode(f.payload).unwrap(), hello);
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let hb = Heartbeat {
            head_lsn: 1.into(),
            durable_lsn: 1.into(),
            unix_micros: 2.into(),
        };
        let bytes = frame(FrameKind::Heartbeat, hb.as_bytes());
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[byte] ^= 1 << bit;
                // The header checksum covers the length, so even a flip
                // there is refused at once rather than waited on.
                assert!(
                    decode_frame(&b, 1 << 20).is_err(),
                    "flip at {byte}.{bit} accepted"
                );
            }
        }
    }

    #[test]
    fn garbage_and_limits_are_typed_errors() {
        assert!(matches!(
            decode_frame(b"GET / HTTP/1.1\r\n", 1024),
            Err(FrameError::Magic(_))
        ));
        assert_eq!(
            decode_frame(&[0u8; 40], 1024).unwrap_err(),
            FrameError::Magic(0)
        );
        let big = frame(FrameKind::Records, &[1u8; 2000]);
        assert!(matches!(
            decode_frame(&big, 1024),
            Err(FrameError::Length { length: 2000, .. })
        ));
        assert!(Hello::decode(&[0u8; 10]).is_err());
        let mut bad = Hello {
            cluster_id: [0; 16],
            shard_count: 1,
            lsn: 0,
            chain: 0,
            history: vec![(2, 0), (1, 10)],
            node_id: String::new(),
        };
        assert!(
            Hello::decode(&bad.encode()).is_err(),
            "epochs must increase"
        );
        bad.history = vec![(1, 0)];
        let mut payload = bad.encode();
        payload.push(0);
        assert!(Hello::decode(&payload).is_err(), "trailing bytes");
        assert!(decode_fixed::<Ack>(FrameKind::Ack, &[0u8; 23]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoding_never_panics(input in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode_frame(&input, 256);
            let _ = Hello::decode(&input);
        }
    }
}
