//! The body of a `Data` WAL record for the key-value state: a batch of
//! operations that carry resulting values (a put carries the new value, an
//! increment is logged as the put of its result), so replaying a record twice
//! leaves the same state as replaying it once.
//!
//! ```text
//! BatchHeader (8 bytes) | OpHeader (12 bytes) key value | OpHeader key value | ...
//! ```

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::StateError;

/// Largest key, in bytes.
pub const KEY_BYTES_MAX: usize = 64 << 10;

/// Header of a batch body.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BatchHeader {
    /// Number of operations that follow; checked against the body length
    /// before anything is read.
    pub count: U32,
    /// Reserved; must be zero.
    pub reserved: U32,
}

const _: () = assert!(size_of::<BatchHeader>() == 8);

/// Header of one operation.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OpHeader {
    /// 1 put, 2 delete.
    pub kind: u8,
    /// Reserved; must be zero.
    pub reserved: [u8; 3],
    /// Key length; at most [`KEY_BYTES_MAX`].
    pub key_len: U32,
    /// Value length; zero for a delete.
    pub value_len: U32,
}

const _: () = assert!(size_of::<OpHeader>() == 12);

const PUT: u8 = 1;
const DELETE: u8 = 2;

/// One operation, borrowed from a record body or from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    Put { key: &'a [u8], value: &'a [u8] },
    Delete { key: &'a [u8] },
}

impl<'a> Op<'a> {
    pub fn key(&self) -> &'a [u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// Encodes a batch into `out` (cleared first).
pub fn encode_batch(out: &mut Vec<u8>, ops: &[Op<'_>]) -> Result<(), StateError> {
    out.clear();
    let header = BatchHeader {
        count: U32::new(ops.len() as u32),
        reserved: U32::new(0),
    };
    out.extend_from_slice(header.as_bytes());
    for op in ops {
        let (kind, key, value): (u8, &[u8], &[u8]) = match op {
            Op::Put { key, value } => (PUT, key, value),
            Op::Delete { key } => (DELETE, key, &[]),
        };
        if key.len() > KEY_BYTES_MAX {
            return Err(StateError::KeyTooLarge { len: key.len() });
        }
        let op_header = OpHeader {
            kind,
            reserved: [0; 3],
            key_len: U32::new(key.len() as u32),
            value_len: U32::new(value.len() as u32),
        };
        out.extend_from_slice(op_header.as_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(value);
    }
    Ok(())
}

/// Decodes a batch body. Never panics; every length is checked before use.
pub fn decode_batch(body: &[u8]) -> Result<Vec<Op<'_>>, StateError> {
    let bad = |why: &'static str| StateError::BadBody { why };
    let (header, mut rest) =
        BatchHeader::read_from_prefix(body).map_err(|_| bad("shorter than a batch header"))?;
    if header.reserved.get() != 0 {
        return Err(bad("reserved batch bytes are not zero"));
    }
    let count = header.count.get() as usize;
    if count > rest.len() / size_of::<OpHeader>() {
        return Err(bad("more operations than the body can hold"));
    }
    let mut ops = Vec::with_capacity(count);
    for _ in 0..count {
        let (op, after) =
            OpHeader::read_from_prefix(rest).map_err(|_| bad("truncated operation header"))?;
        let (key_len, value_len) = (op.key_len.get() as usize, op.value_len.get() as usize);
        if op.reserved != [0; 3] || key_len > KEY_BYTES_MAX {
            return Err(bad("bad operation header"));
        }
        let Some(total) = key_len.checked_add(value_len).filter(|t| *t <= after.len()) else {
            return Err(bad("operation runs past the body"));
        };
        let (key, value) = after[..total].split_at(key_len);
        ops.push(match (op.kind, value_len) {
            (PUT, _) => Op::Put { key, value },
            (DELETE, 0) => Op::Delete { key },
            _ => return Err(bad("unknown operation kind")),
        });
        rest = &after[total..];
    }
    if !rest.is_empty() {
        return Err(bad("bytes after the last operation"));
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let ops = [
            Op::Put {
                key: b"a",
                value: b"1",
            },
            Op::Delete { key: b"b" },
            Op::Put {
                key: b"",
                value: b"",
            },
        ];
        let mut body = Vec::new();
        encode_batch(&mut body, &ops).unwrap();
        assert_eq!(decode_batch(&body).unwrap(), ops);
    }

    #[test]
    fn every_truncation_and_garbage_is_an_error() {
        let mut body = Vec::new();
        encode_batch(
            &mut body,
            &[Op::Put {
                key: b"key",
                value: b"value",
            }],
        )
        .unwrap();
        for cut in 0..body.len() {
            assert!(decode_batch(&body[..cut]).is_err(), "cut {cut}");
        }
        let mut huge = body.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_batch(&huge).is_err());
        let mut long_key = body.clone();
        long_key[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_batch(&long_key).is_err());
    }
}
