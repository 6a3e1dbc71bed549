//! WAL record: a 32-byte header followed by the body.
//!
//! A record is bound to its place: its header holds the LSN it must sit at and
//! the epoch that wrote it, and its checksum is a CRC32C chained from the
//! previous record's checksum over the header (after the checksum field) and the
//! body. So a record read from the wrong place, from an older life of a file, or
//! from a different history fails to validate, and two logs that agree on
//! `(lsn, chain)` agree on everything before it.
//!
//! All-zero bytes never validate: kind 0 is not a kind, and the checksum is
//! masked so a zero checksum is not what zero bytes produce.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::FormatError;

/// Size of [`RecordHeader`] in bytes.
pub const RECORD_HEADER_BYTES: usize = 32;

/// Largest body a record may carry. A length field above this is rejected
/// before anything is allocated or read from it.
pub const RECORD_BODY_MAX: usize = 16 << 20;

/// XORed into every record and segment checksum so that the CRC of zeros is
/// not zero (sled does the same).
pub const CHECKSUM_MASK: u32 = 0xa282_ead8;

/// The on-disk and on-wire header of one WAL record. Little-endian, unaligned.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RecordHeader {
    /// CRC32C seeded with the previous record's `checksum` (the chain), over
    /// bytes 4..32 of this header and then the body, XOR [`CHECKSUM_MASK`].
    pub checksum: U32,
    /// Body length in bytes; at most [`RECORD_BODY_MAX`].
    pub length: U32,
    /// The record's own LSN: the byte offset of this header in the shard's
    /// logical WAL stream. Binds the record to its place.
    pub lsn: U64,
    /// The epoch (fencing term) of the primary that wrote the record. Never
    /// decreases along a log.
    pub epoch: U64,
    /// What the body is, see [`RecordKind`]. Zero is invalid.
    pub kind: u8,
    /// Reserved for flags; must be zero in format version 1.
    pub flags: u8,
    /// Bytes from the log's durable LSN at the moment this record was staged
    /// up to this record's LSN (saturating): everything below
    /// `lsn - durable_gap` was durable before this record existed. Recovery
    /// uses it to prove that damage before this record hit acknowledged
    /// data (corruption) rather than writes that were never synced (a torn
    /// tail), however many writes were in flight.
    pub durable_gap: U32,
    /// Reserved; must be zero.
    pub reserved: [u8; 2],
}

const _: () = assert!(size_of::<RecordHeader>() == RECORD_HEADER_BYTES);

/// What a record's body holds. The WAL itself treats bodies as opaque; the
/// kinds let readers (the engine, replication, `tidewal wal inspect`) tell
/// them apart without parsing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// Application bytes: the engine's encoded operations.
    Data = 1,
    /// Written once when an epoch starts writing to this log; the body is
    /// empty. Marks where the epoch history changes.
    EpochStart = 2,
    /// No operation; the body is ignored. Used to fill and to test.
    Noop = 3,
}

impl RecordKind {
    /// The kind for a header byte, or `None` when the byte is not a kind.
    pub fn from_u8(kind: u8) -> Option<Self> {
        match kind {
            1 => Some(Self::Data),
            2 => Some(Self::EpochStart),
            3 => Some(Self::Noop),
            _ => None,
        }
    }
}

/// What the decoder needs to know about the place it reads: where the record
/// must sit and what came before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// LSN the record must carry.
    pub lsn: u64,
    /// Checksum of the previous record (the chain seed).
    pub chain: u32,
    /// Epoch of the previous record; the record's epoch may not be lower.
    pub epoch: u64,
}

/// A record validated in place: its header and a borrowed body.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub header: &'a RecordHeader,
    pub body: &'a [u8],
}

impl RecordRef<'_> {
    pub fn lsn(&self) -> u64 {
        self.header.lsn.get()
    }
    pub fn epoch(&self) -> u64 {
        self.header.epoch.get()
    }
    pub fn checksum(&self) -> u32 {
        self.header.checksum.get()
    }
    pub fn kind(&self) -> RecordKind {
        // Validated by decode_record.
        RecordKind::from_u8(self.header.kind).unwrap_or(RecordKind::Noop)
    }
    /// Bytes the record occupies in the log: header and body.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.body.len()
    }
    /// Where the next record is expected.
    pub fn next(&self) -> Expect {
        Expect {
            lsn: self.lsn() + self.encoded_len() as u64,
            chain: self.checksum(),
            epoch: self.epoch(),
        }
    }
}

/// The outcome of decoding when no error was found.
#[derive(Debug, Clone, Copy)]
pub enum Decoded<'a> {
    Record(RecordRef<'a>),
    /// The bytes end inside the record; `needed` bytes in all would complete it.
    Incomplete {
        needed: usize,
    },
}

/// The chained checksum of a header (bytes after the checksum field) and body.
pub fn record_checksum(chain: u32, header_tail: &[u8], body: &[u8]) -> u32 {
    let crc = super::crc32c_append(chain, header_tail);
    super::crc32c_append(crc, body) ^ CHECKSUM_MASK
}

/// Encodes one record at `lsn` after a record whose checksum was `chain`,
/// while the log was durable up to `durable_lsn`, appending header and body
/// to `out`. Returns the new record's checksum, the chain for the next one.
pub fn encode_record(
    out: &mut impl ByteSink,
    kind: RecordKind,
    epoch: u64,
    lsn: u64,
    chain: u32,
    durable_lsn: u64,
    body: &[u8],
) -> u32 {
    debug_assert!(durable_lsn <= lsn);
    assert!(body.len() <= RECORD_BODY_MAX, "record body over the limit");
    let header = RecordHeader {
        checksum: U32::new(0),
        length: U32::new(body.len() as u32),
        lsn: U64::new(lsn),
        epoch: U64::new(epoch),
        kind: kind as u8,
        flags: 0,
        durable_gap: U32::new(u32::try_from(lsn - durable_lsn).unwrap_or(u32::MAX)),
        reserved: [0; 2],
    };
    // The checksum is taken over the record as placed, header and body
    // side by side: one call over contiguous bytes, not one for each (a
    // call's fixed cost is much of a 100-byte record's).
    out.put(header.as_bytes());
    out.put(body);
    let record = out.last_mut(RECORD_HEADER_BYTES + body.len());
    let checksum = chained_checksum(chain, &record[4..]);
    record[..4].copy_from_slice(&checksum.to_le_bytes());
    checksum
}

/// [`record_checksum`] of a record's bytes after its checksum field (its
/// header's tail and its body, contiguous).
fn chained_checksum(chain: u32, header_tail_and_body: &[u8]) -> u32 {
    super::crc32c_append(chain, header_tail_and_body) ^ CHECKSUM_MASK
}

/// Where [`encode_record`] appends: a `Vec<u8>`, or the log's block-aligned
/// staging buffer ([`crate::io::AlignedBuf`]).
pub trait ByteSink {
    fn put(&mut self, bytes: &[u8]);
    /// The last `len` bytes put (`len` at most all of them).
    fn last_mut(&mut self, len: usize) -> &mut [u8];
}

impl ByteSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn last_mut(&mut self, len: usize) -> &mut [u8] {
        let start = self.len() - len;
        &mut self[start..]
    }
}

/// Decodes the record at the start of `buf`, which must sit where `expect`
/// says. Never panics: returns the record, `Incomplete`, or a typed error.
pub fn decode_record<'a>(buf: &'a [u8], expect: Expect) -> Result<Decoded<'a>, FormatError> {
    let Ok((header, rest)) = RecordHeader::ref_from_prefix(buf) else {
        // Even all-zero, a short buffer may be the start of a header whose
        // first bytes are zero: only the caller knows whether more follows.
        return Ok(Decoded::Incomplete {
            needed: RECORD_HEADER_BYTES,
        });
    };
    check_header(header, expect)?;
    let length = header.length.get() as usize;
    let Some(body) = rest.get(..length) else {
        return Ok(Decoded::Incomplete {
            needed: RECORD_HEADER_BYTES + length,
        });
    };
    let got = chained_checksum(expect.chain, &buf[4..RECORD_HEADER_BYTES + length]);
    if got != header.checksum.get() {
        return Err(FormatError::Checksum {
            lsn: expect.lsn,
            expected: header.checksum.get(),
            got,
        });
    }
    Ok(Decoded::Record(RecordRef { header, body }))
}

/// Checks everything about a header that does not need the body.
fn check_header(header: &RecordHeader, expect: Expect) -> Result<(), FormatError> {
    let lsn = expect.lsn;
    if header.as_bytes().iter().all(|b| *b == 0) {
        return Err(FormatError::Zeroed { lsn });
    }
    if RecordKind::from_u8(header.kind).is_none() {
        return Err(FormatError::Kind {
            lsn,
            kind: header.kind,
        });
    }
    if header.lsn.get() != lsn {
        return Err(FormatError::Misplaced {
            lsn,
            got: header.lsn.get(),
        });
    }
    let too_far = lsn
        .checked_add((RECORD_HEADER_BYTES + header.length.get() as usize) as u64)
        .is_none();
    if header.length.get() as usize > RECORD_BODY_MAX || too_far {
        return Err(FormatError::Length {
            lsn,
            length: header.length.get(),
        });
    }
    if header.flags != 0 || header.reserved != [0; 2] || header.durable_gap.get() as u64 > lsn {
        return Err(FormatError::Reserved { lsn });
    }
    if header.epoch.get() < expect.epoch {
        return Err(FormatError::EpochRegressed {
            lsn,
            previous: expect.epoch,
            got: header.epoch.get(),
        });
    }
    Ok(())
}

/// When `buf` starts with something that looks like a record header bound
/// to `lsn` (without knowing the chain to verify it), the LSN below which
/// the log was durable when that record was staged. Recovery uses it to tell
/// a torn tail from corruption of acknowledged records. A false positive in
/// garbage needs an 8-byte field equal to its own position.
pub fn plausible_durable_floor_at(buf: &[u8], lsn: u64) -> Option<u64> {
    let (header, _) = RecordHeader::ref_from_prefix(buf).ok()?;
    let plausible = header.lsn.get() == lsn
        && RecordKind::from_u8(header.kind).is_some()
        && header.length.get() as usize <= RECORD_BODY_MAX
        && header.flags == 0
        && header.reserved == [0; 2]
        && header.durable_gap.get() as u64 <= lsn;
    plausible.then(|| lsn - header.durable_gap.get() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Expect = Expect {
        lsn: 0,
        chain: 0,
        epoch: 0,
    };

    fn one(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(&mut out, RecordKind::Data, 1, 0, 0, 0, body);
        out
    }

    #[test]
    fn checksum_is_the_documented_one() {
        // Encoding checksums the placed bytes in one pass; it must equal
        // the definition over header tail and body, whatever precedes the
        // record in the buffer.
        for body in [&b""[..], b"x", &[7u8; 100], &[9u8; 4096]] {
            let mut out = vec![0xaa; 13];
            let sum = encode_record(&mut out, RecordKind::Data, 3, 13, 0x1234, 5, body);
            let record = &out[13..];
            assert_eq!(record[..4], sum.to_le_bytes());
            let tail = &record[4..RECORD_HEADER_BYTES];
            assert_eq!(sum, record_checksum(0x1234, tail, body));
        }
    }

    #[test]
    fn round_trip_and_chain() {
        let mut log = Vec::new();
        let c1 = encode_record(&mut log, RecordKind::Data, 1, 0, 0, 0, b"hello");
        let second_lsn = log.len() as u64;
        encode_record(&mut log, RecordKind::Noop, 2, second_lsn, c1, 0, b"");
        let Decoded::Record(r) = decode_record(&log, START).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(r.body, b"hello");
        assert_eq!(r.kind(), RecordKind::Data);
        let next = r.next();
        assert_eq!(next.lsn, second_lsn);
        let Decoded::Record(r2) = decode_record(&log[second_lsn as usize..], next).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(r2.epoch(), 2);
        // The same bytes after a different history do not validate.
        let wrong = Expect { chain: 7, ..next };
        assert!(matches!(
            decode_record(&log[second_lsn as usize..], wrong),
            Err(FormatError::Checksum { .. })
        ));
    }

    #[test]
    fn zeros_never_validate() {
        for len in [32, 64, 4096] {
            let zeros = vec![0u8; len];
            for lsn in [0, 32, 4096] {
                let expect = Expect { lsn, ..START };
                let got = decode_record(&zeros, expect);
                assert!(
                    matches!(got, Err(FormatError::Zeroed { .. })),
                    "{len} {lsn}: {got:?}"
                );
            }
        }
        for len in [0, 1, 31] {
            let zeros = vec![0u8; len];
            let got = decode_record(&zeros, START);
            assert!(
                matches!(got, Ok(Decoded::Incomplete { needed: 32 })),
                "{got:?}"
            );
        }
    }

    #[test]
    fn misplaced_and_regressed_are_rejected() {
        let rec = one(b"x");
        let at_64 = Expect { lsn: 64, ..START };
        assert!(matches!(
            decode_record(&rec, at_64),
            Err(FormatError::Misplaced { got: 0, .. })
        ));
        let later_epoch = Expect { epoch: 2, ..START };
        assert!(matches!(
            decode_record(&rec, later_epoch),
            Err(FormatError::EpochRegressed { .. })
        ));
    }

    #[test]
    fn length_is_checked_before_use() {
        let mut rec = one(b"abc");
        rec[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_record(&rec, START),
            Err(FormatError::Length { .. })
        ));
    }

    #[test]
    fn truncated_is_incomplete() {
        let rec = one(b"abcdef");
        for cut in 1..rec.len() {
            match decode_record(&rec[..cut], START) {
                Ok(Decoded::Incomplete { needed }) => assert!(needed > cut),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_bit_flip_is_caught() {
        let rec = one(b"payload bytes");
        for byte in 0..rec.len() {
            for bit in 0..8 {
                let mut bad = rec.clone();
                bad[byte] ^= 1 << bit;
                let got = decode_record(&bad, START);
                assert!(
                    !matches!(got, Ok(Decoded::Record(_))),
                    "flip {byte}:{bit} validated"
                );
            }
        }
    }
}
