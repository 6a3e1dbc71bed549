//! One shard: its WAL and its key-value state, on one executor.
//!
//! A write is encoded once into a WAL record body, staged in the WAL (which
//! fixes its LSN), and applied to the state in the same synchronous step, so
//! the state always equals the log's staged prefix in LSN order. Its commit
//! level then decides what the caller waits for: nothing (`Memory`) or the
//! sync that covers the record (`Local`). Reads see staged writes (as Redis
//! and PostgreSQL with `synchronous_commit = off` do); a reader that must
//! only see durable data waits for a receipt first.
//!
//! When the WAL fails (a write or sync error), staged writes may or may not be
//! durable and their callers got an error meaning exactly that; the shard is
//! then fail-stop: [`Shard::failure`] says so, and it must be reopened, which
//! rebuilds the state from what the log really holds.
//!
//! Open = WAL recovery, then replay of every `Data` record into the state.

use std::cell::RefCell;

use bytes::Bytes;

use crate::format::RecordKind;
use crate::io::Storage;
use crate::state::{KvState, Op, StateError, StateMachine, encode_batch};
use crate::wal::{Wal, WalError, WalOptions};

/// What a write waits for before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitLevel {
    /// Staged and applied; not yet durable.
    Memory,
    /// Durable on this node's disk.
    #[default]
    Local,
}

/// What a write returns: where it sits and what was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardReceipt {
    pub shard: u32,
    pub epoch: u64,
    pub lsn: u64,
    pub level: CommitLevel,
}

/// Errors of the engine layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// A shard of the key space on one executor.
pub struct Shard<S: Storage + 'static> {
    wal: Wal<S>,
    state: RefCell<KvState>,
    /// Reused encode buffer: no allocation per write.
    scratch: RefCell<Vec<u8>>,
}

impl<S: Storage + 'static> Shard<S> {
    /// Recovers the WAL and replays it into a fresh state.
    pub async fn open(storage: S, options: WalOptions) -> Result<Self, EngineError> {
        let wal = Wal::open(storage, options).await?;
        let mut state = KvState::new();
        let mut pos = wal.first_position();
        loop {
            let batch = wal.read(pos, 1 << 20).await?;
            if batch.records.is_empty() {
                break;
            }
            for record in batch.records.iter().filter(|r| r.kind == RecordKind::Data) {
                state.apply(record.lsn, &record.body)?;
            }
            pos = batch.next;
        }
        Ok(Self {
            wal,
            state: RefCell::new(state),
            scratch: RefCell::new(Vec::new()),
        })
    }

    /// Writes `ops` atomically (one record) at `level`.
    pub async fn write(
        &self,
        ops: &[Op<'_>],
        level: CommitLevel,
    ) -> Result<ShardReceipt, EngineError> {
        self.wal.wait_for_space().await?;
        // From here to the submit there is no await: the record's LSN order
        // and the order of application to the state are the same.
        let pending = {
            let mut scratch = self.scratch.borrow_mut();
            encode_batch(&mut scratch, ops)?;
            self.wal.submit(RecordKind::Data, &scratch)?
        };
        let receipt = pending.receipt();
        self.state.borrow_mut().apply_ops(receipt.lsn, ops);
        if level == CommitLevel::Local {
            pending.await?;
        }
        Ok(ShardReceipt {
            shard: receipt.shard,
            epoch: receipt.epoch,
            lsn: receipt.lsn,
            level,
        })
    }

    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        level: CommitLevel,
    ) -> Result<ShardReceipt, EngineError> {
        self.write(&[Op::Put { key, value }], level).await
    }

    pub async fn delete(
        &self,
        key: &[u8],
        level: CommitLevel,
    ) -> Result<ShardReceipt, EngineError> {
        self.write(&[Op::Delete { key }], level).await
    }

    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.state.borrow().get(key)
    }

    /// Up to `limit` entries with `start <= key < end`, in key order.
    pub fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Vec<(Bytes, Bytes)> {
        self.state.borrow().scan(start, end, limit)
    }

    /// Up to `limit` entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Vec<(Bytes, Bytes)> {
        self.state.borrow().scan_prefix(prefix, limit)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.state.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.borrow().is_empty()
    }

    /// The error that stopped this shard's WAL, if one did.
    pub fn failure(&self) -> Option<EngineError> {
        self.wal.failure().map(EngineError::Wal)
    }

    /// The WAL, for its positions, counters and retention.
    pub fn wal(&self) -> &Wal<S> {
        &self.wal
    }

    /// Makes everything staged durable and closes the WAL.
    pub async fn close(self) -> Result<(), EngineError> {
        Ok(self.wal.close().await?)
    }
}
