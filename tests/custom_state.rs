//! A service's own state machine in a shard: its record bodies, its
//! snapshots, its replay, through the same WAL and snapshot machinery as the
//! default key-value state.

mod common;

use bytes::Bytes;
use common::*;
use tidewal::FaultStorage;
use tidewal::engine::{CommitLevel, EngineError, Shard};
use tidewal::state::{StateError, StateMachine};

/// Meter readings: the last value per meter. A body is
/// `name_len u8, name, reading u64 LE`: a resulting value, so replay is
/// idempotent.
#[derive(Clone, Default)]
struct Meters {
    last: imbl::OrdMap<Bytes, u64>,
    applied: u64,
    encoded: imbl::OrdMap<Bytes, Bytes>,
}

fn reading(name: &str, value: u64) -> Vec<u8> {
    let mut b = vec![name.len() as u8];
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&value.to_le_bytes());
    b
}

impl StateMachine for Meters {
    fn apply(&mut self, lsn: u64, body: &[u8]) -> Result<(), StateError> {
        let bad = StateError::BadBody {
            why: "not a meter reading",
        };
        let (&len, rest) = body.split_first().ok_or(bad.clone())?;
        if rest.len() != len as usize + 8 {
            return Err(bad);
        }
        let (name, value) = rest.split_at(len as usize);
        let value_bytes = Bytes::copy_from_slice(value);
        let value = u64::from_le_bytes(value.try_into().map_err(|_| bad)?);
        let name = Bytes::copy_from_slice(name);
        self.last.insert(name.clone(), value);
        self.encoded.insert(name, value_bytes);
        self.applied = lsn;
        Ok(())
    }

    fn applied_lsn(&self) -> u64 {
        self.applied
    }

    fn entries(&self) -> Box<dyn Iterator<Item = (&[u8], &[u8])> + '_> {
        Box::new(self.encoded.iter().map(|(k, v)| (&k[..], &v[..])))
    }

    fn restore(&mut self, key: Bytes, value: Bytes, lsn: u64) {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&value[..8]);
        self.last.insert(key.clone(), u64::from_le_bytes(raw));
        self.encoded.insert(key, value);
        self.applied = lsn;
    }
}

#[test]
fn a_custom_state_machine_snapshots_and_replays() {
    run(|| async {
        let storage = FaultStorage::new();
        let shard: Shard<FaultStorage, Meters> =
            Shard::open(storage.clone(), small_options()).await.unwrap();
        for i in 0..300u64 {
            shard
                .write_body(&reading(&format!("m{}", i % 17), i), CommitLevel::Local)
                .await
                .unwrap();
            if i == 100 || i == 200 {
                shard.snapshot().await.unwrap();
            }
        }
        // A body the machine does not understand is refused and never logged.
        let err = shard
            .write_body(b"\x09bad", CommitLevel::Local)
            .await
            .unwrap_err();
        assert!(
            matches!(err, EngineError::State(StateError::BadBody { .. })),
            "{err}"
        );
        let before: Vec<(Bytes, u64)> =
            shard.read(|m| m.last.iter().map(|(k, v)| (k.clone(), *v)).collect());
        assert_eq!(before.len(), 17);
        shard.close().await.unwrap();

        let shard: Shard<FaultStorage, Meters> =
            Shard::open(storage, small_options()).await.unwrap();
        assert!(
            shard.open_report().snapshot.is_some(),
            "restarted from a snapshot"
        );
        assert_eq!(shard.open_report().replayed, 99);
        let after: Vec<(Bytes, u64)> =
            shard.read(|m| m.last.iter().map(|(k, v)| (k.clone(), *v)).collect());
        assert_eq!(after, before);
        assert_eq!(shard.read(|m| m.last.get(&b"m3"[..]).copied()), Some(292));
        shard.close().await.unwrap();
    });
}

/// A body the log cannot take is refused before the state sees it: the
/// state never runs ahead of the log.
#[test]
fn a_body_too_large_for_the_log_never_reaches_the_state() {
    run(|| async {
        let mut options = small_options();
        options.segment_bytes = 8192;
        options.batch_bytes_max = 4096;
        options.staged_bytes_max = 4096;
        let shard: Shard<FaultStorage> = Shard::open(FaultStorage::new(), options).await.unwrap();
        let max = shard.wal().record_body_max();
        // A batch the key-value state takes, but too long for one record.
        let value = vec![7u8; max];
        let mut body = Vec::new();
        tidewal::state::encode_batch(
            &mut body,
            &[tidewal::state::Op::Put {
                key: b"big",
                value: &value,
            }],
        )
        .unwrap();
        assert!(body.len() > max);
        let err = shard
            .write_body(&body, CommitLevel::Local)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
        assert_eq!(shard.get(b"big"), None, "the state took a refused body");
        shard.put(b"small", b"v", CommitLevel::Local).await.unwrap();
        assert_eq!(shard.len(), 1);
        shard.close().await.unwrap();
    });
}
