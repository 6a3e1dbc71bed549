//! State machines built from WAL records.
//!
//! A shard's state is a pure function of its log: records carry resulting
//! values, never relative operations, so replay from any snapshot's LSN is
//! exact and replaying a record twice changes nothing. [`StateMachine`] is
//! what a service implements to keep its own state; [`KvState`], an ordered
//! key-value map, is the default.
//!
//! `KvState` is a persistent (structurally shared) ordered map: a frozen
//! copy for a snapshot or a long scan costs O(1), and writes go on beside it.

mod op;
mod snapshot;

use std::ops::Bound;

use bytes::Bytes;

pub use op::{BatchHeader, KEY_BYTES_MAX, Op, OpHeader, decode_batch, encode_batch};
pub use snapshot::{LoadedSnapshot, list_snapshots, load_newest, verify_snapshot, write_snapshot};

/// Errors of the state layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("record body: {why}")]
    BadBody { why: &'static str },
    #[error("key of {len} bytes is over the limit of {KEY_BYTES_MAX}")]
    KeyTooLarge { len: usize },
    #[error("record at lsn {lsn} applied after lsn {applied}")]
    OutOfOrder { lsn: u64, applied: u64 },
}

/// A deterministic state built by applying record bodies in LSN order: what
/// a service implements to keep its own state in a shard (see
/// `engine::Shard::write_body`). `Clone` must be cheap (structural sharing):
/// a snapshot freezes the state by cloning it while writes go on.
pub trait StateMachine: Clone + Default + 'static {
    /// Applies the body of the `Data` record at `lsn`. Bodies are applied in
    /// LSN order; a body that does not decode is an error and changes nothing.
    /// Bodies must carry resulting values, so that applying one twice is
    /// the same as applying it once.
    fn apply(&mut self, lsn: u64, body: &[u8]) -> Result<(), StateError>;
    /// LSN of the last record applied (0 if none).
    fn applied_lsn(&self) -> u64;
    /// Every entry of the state as opaque `(key, value)` bytes: what a
    /// snapshot holds.
    fn entries(&self) -> Box<dyn Iterator<Item = (&[u8], &[u8])> + '_>;
    /// Adds one entry read back from a snapshot taken at `lsn`.
    fn restore(&mut self, key: Bytes, value: Bytes, lsn: u64);
}

/// The default state: an ordered map from keys to values.
#[derive(Debug, Clone, Default)]
pub struct KvState {
    map: imbl::OrdMap<Key, Bytes>,
    applied_lsn: u64,
}

/// Longest key held in the map's own nodes.
const INLINE_KEY_BYTES: usize = 23;

/// A key of the map, held in the tree's node itself when it is short (most
/// keys are), so the binary search in each node compares bytes it already
/// has instead of following a pointer per comparison: on a map of 100k keys
/// each of those was a cache miss, and an insert or lookup cost ~1 us.
/// Ordered as its bytes.
#[derive(Clone)]
enum Key {
    Inline {
        len: u8,
        bytes: [u8; INLINE_KEY_BYTES],
    },
    Shared(Bytes),
}

impl Key {
    fn new(key: &[u8]) -> Key {
        if key.len() <= INLINE_KEY_BYTES {
            let mut bytes = [0; INLINE_KEY_BYTES];
            bytes[..key.len()].copy_from_slice(key);
            Key::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Key::Shared(Bytes::copy_from_slice(key))
        }
    }

    /// As [`Key::new`], keeping `key` itself (no copy) when it is too long
    /// to hold in place.
    fn from_bytes(key: Bytes) -> Key {
        if key.len() <= INLINE_KEY_BYTES {
            Key::new(&key)
        } else {
            Key::Shared(key)
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Shared(b) => b,
        }
    }

    fn to_bytes(&self) -> Bytes {
        match self {
            Key::Inline { .. } => Bytes::copy_from_slice(self.as_slice()),
            Key::Shared(b) => b.clone(),
        }
    }
}

const _: () = assert!(size_of::<Key>() <= size_of::<Bytes>());

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_slice()))
    }
}

impl KvState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.map.get(key).cloned()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Up to `limit` entries with `start <= key < end` (`end` unbounded when
    /// `None`), in key order.
    pub fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Vec<(Bytes, Bytes)> {
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        self.map
            .range::<_, [u8]>((Bound::Included(start), upper))
            .take(limit)
            .map(|(k, v)| (k.to_bytes(), v.clone()))
            .collect()
    }

    /// Up to `limit` entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Vec<(Bytes, Bytes)> {
        self.map
            .range::<_, [u8]>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.as_slice().starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.to_bytes(), v.clone()))
            .collect()
    }

    /// Applies decoded operations (already logged at `lsn`).
    pub fn apply_ops(&mut self, lsn: u64, ops: &[Op<'_>]) {
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    self.map
                        .insert(Key::new(key), Bytes::copy_from_slice(value));
                }
                Op::Delete { key } => {
                    self.map.remove(*key);
                }
            }
        }
        self.applied_lsn = lsn;
    }

    /// Every entry in key order: what a snapshot holds.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Bytes)> {
        self.map.iter().map(|(k, v)| (k.as_slice(), v))
    }
}

impl StateMachine for KvState {
    fn apply(&mut self, lsn: u64, body: &[u8]) -> Result<(), StateError> {
        if lsn < self.applied_lsn {
            return Err(StateError::OutOfOrder {
                lsn,
                applied: self.applied_lsn,
            });
        }
        let ops = decode_batch(body)?;
        self.apply_ops(lsn, &ops);
        Ok(())
    }

    fn applied_lsn(&self) -> u64 {
        self.applied_lsn
    }

    fn entries(&self) -> Box<dyn Iterator<Item = (&[u8], &[u8])> + '_> {
        Box::new(self.map.iter().map(|(k, v)| (k.as_slice(), &v[..])))
    }

    fn restore(&mut self, key: Bytes, value: Bytes, lsn: u64) {
        self.map.insert(Key::from_bytes(key), value);
        self.applied_lsn = lsn;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Keys held in place and keys held behind a pointer order exactly
        /// as their bytes (zeros and prefixes included).
        #[test]
        fn keys_order_as_their_bytes(
            a in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..40),
            b in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..40),
        ) {
            let (ka, kb) = (Key::new(&a), Key::new(&b));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(ka == kb, a == b);
            prop_assert_eq!(ka.as_slice(), &a[..]);
            prop_assert_eq!(&ka.to_bytes()[..], &a[..]);
        }
    }

    #[test]
    fn short_and_long_keys_are_found_scanned_and_restored() {
        let mut s = KvState::new();
        let long = "k".repeat(INLINE_KEY_BYTES + 1);
        let keys = [
            "k".to_string(),
            "k\0".to_string(),
            "k".repeat(INLINE_KEY_BYTES),
            long.clone(),
            format!("{long}x"),
            "l".to_string(),
        ];
        for (i, k) in keys.iter().enumerate() {
            s.apply(
                i as u64 + 1,
                &body(&[Op::Put {
                    key: k.as_bytes(),
                    value: k.as_bytes(),
                }]),
            )
            .unwrap();
        }
        for k in &keys {
            assert_eq!(s.get(k.as_bytes()).as_deref(), Some(k.as_bytes()));
        }
        let mut sorted: Vec<&String> = keys.iter().collect();
        sorted.sort();
        let scanned: Vec<Bytes> = s.scan(b"", None, 100).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            scanned,
            sorted
                .iter()
                .map(|k| Bytes::from(k.to_string()))
                .collect::<Vec<_>>()
        );
        assert_eq!(s.scan_prefix(long.as_bytes(), 10).len(), 2);
        assert_eq!(s.scan(b"k", Some(b"l"), 10).len(), 5);
        // A snapshot's entries restore to the same map.
        let mut restored = KvState::new();
        for (k, v) in s.entries() {
            restored.restore(Bytes::copy_from_slice(k), Bytes::copy_from_slice(v), 6);
        }
        assert_eq!(restored.scan(b"", None, 100), s.scan(b"", None, 100));
        s.apply(
            7,
            &body(&[Op::Delete {
                key: long.as_bytes(),
            }]),
        )
        .unwrap();
        assert!(s.get(long.as_bytes()).is_none());
        assert_eq!(s.len(), keys.len() - 1);
    }

    fn body(ops: &[Op<'_>]) -> Vec<u8> {
        let mut b = Vec::new();
        encode_batch(&mut b, ops).unwrap();
        b
    }

    #[test]
    fn apply_scan_and_replay_is_idempotent() {
        let mut s = KvState::new();
        let b1 = body(&[
            Op::Put {
                key: b"a1",
                value: b"x",
            },
            Op::Put {
                key: b"a2",
                value: b"y",
            },
        ]);
        let b2 = body(&[
            Op::Delete { key: b"a1" },
            Op::Put {
                key: b"b",
                value: b"z",
            },
        ]);
        s.apply(10, &b1).unwrap();
        s.apply(20, &b2).unwrap();
        let once = s.scan(b"", None, 10);
        // Replaying the same record again leaves the same state.
        s.apply(20, &b2).unwrap();
        assert_eq!(s.scan(b"", None, 10), once);
        assert_eq!(once.len(), 2);
        assert_eq!(
            s.scan_prefix(b"a", 10),
            vec![(Bytes::from("a2"), Bytes::from("y"))]
        );
        assert_eq!(s.scan(b"a2", Some(b"b"), 10).len(), 1);
        assert!(s.apply(5, &b1).is_err(), "out of order");
        assert!(s.apply(30, b"garbage").is_err());
        assert_eq!(s.get(b"b").as_deref(), Some(&b"z"[..]));
    }
}
