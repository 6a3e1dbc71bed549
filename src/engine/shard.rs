//! One shard: its WAL and its state machine (the key-value map by default,
//! or a service's own through [`Shard::write_body`]), on one executor.
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
//! Open = the newest snapshot that verifies (falling back to an older one,
//! loudly), then WAL replay from the snapshot's position.
//!
//! A snapshot freezes the state (O(1)), waits until the log is durable up to
//! the frozen position, and writes while writes go on. Two snapshots are
//! kept, and the WAL is released only below the older one, so a newest
//! snapshot found damaged at the next start still has a fallback with the
//! WAL to replay from it.

use std::cell::RefCell;

use bytes::Bytes;

use crate::format::{Expect, LogId, RecordKind};
use crate::io::{IoError, Storage};
use crate::state::{
    KvState, Op, StateError, StateMachine, encode_batch, list_snapshots, load_newest,
    write_snapshot,
};
use crate::wal::{Wal, WalError, WalOptions};

/// Present in a shard directory between the installation of an
/// upstream's snapshot and the first durable record of the log that
/// continues it (see [`Shard::open`]).
pub const RESYNC_MARKER: &str = "RESYNC";

/// Prefix of the empty file whose name records the highest epoch the
/// shard's log held before a rewind or a snapshot re-sync took records
/// away, or that its upstream was seen in (`epoch-floor-{epoch:020}`): no
/// epoch at or below it is begun again.
pub const EPOCH_FLOOR_PREFIX: &str = "epoch-floor-";

/// The epoch named by an epoch-floor file, if `name` is one.
pub fn parse_epoch_floor(name: &str) -> Option<u64> {
    parse_epoch_name(name, EPOCH_FLOOR_PREFIX)
}

/// Prefix of the empty file whose name records the highest epoch the shard
/// began itself (`epoch-begun-{epoch:020}`), made durable before the first
/// record of that epoch: see `WalOptions::own_epoch_max`.
pub const EPOCH_BEGUN_PREFIX: &str = "epoch-begun-";

fn parse_epoch_name(name: &str, prefix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Snapshots kept; the WAL is kept from the oldest of them on.
const SNAPSHOTS_KEPT: usize = 2;

/// What a write waits for before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitLevel {
    /// Staged and applied; not yet durable.
    Memory,
    /// Durable on this node's disk.
    #[default]
    Local,
}

/// What [`Shard::update`] writes, decided from a key's current value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Write nothing.
    Keep,
    Put(Bytes),
    Delete,
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
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("the WAL ends at lsn {wal_end}, before the snapshot's lsn {snapshot_lsn}")]
    WalBehindSnapshot { wal_end: u64, snapshot_lsn: u64 },
    #[error(
        "the WAL starts at lsn {first_lsn} and no snapshot that verifies covers what came before it"
    )]
    NoBaseForLog { first_lsn: u64 },
    #[error("{0}")]
    Options(String),
    #[error("data directory {0} is in use by another process (LOCK is held)")]
    Locked(String),
    #[error("data directory: {0}")]
    Meta(String),
    #[error("a batch spanning {shards} shards cannot be atomic; ask for per-shard atomicity")]
    CrossShardBatch { shards: usize },
    #[error("the engine is closed")]
    Closed,
    #[error("a snapshot of this shard is already being taken")]
    SnapshotInProgress,
}

/// What opening a shard found.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// The snapshot the state started from.
    pub snapshot: Option<String>,
    /// Snapshots that did not verify, newest first, with the reason.
    pub skipped_snapshots: Vec<(String, String)>,
    /// WAL records replayed after the snapshot.
    pub replayed: u64,
}

/// A shard of the key space on one executor.
pub struct Shard<S: Storage + Clone + 'static, M: StateMachine = KvState> {
    storage: S,
    log: LogId,
    report: OpenReport,
    wal: Wal<S>,
    state: RefCell<M>,
    /// Reused encode buffer: no allocation per write.
    scratch: RefCell<Vec<u8>>,
    /// One snapshot at a time: two would write the same file.
    snapshotting: std::cell::Cell<bool>,
    /// The marker of a re-sync is still on disk and the log has no record:
    /// removed once the first replicated records are durable.
    resync_pending: std::cell::Cell<bool>,
    /// The highest epoch the log held before records were taken away, or
    /// that its upstream was seen in (see [`EPOCH_FLOOR_PREFIX`]); 0 if
    /// neither.
    epoch_floor: std::cell::Cell<u64>,
    /// The highest epoch this shard began itself (`epoch-begun-N`); 0 if
    /// none since it was created.
    epoch_begun: std::cell::Cell<u64>,
}

impl<S: Storage + Clone + 'static, M: StateMachine> Shard<S, M> {
    /// Loads the newest good snapshot, recovers the WAL and replays it.
    pub async fn open(storage: S, options: WalOptions) -> Result<Self, EngineError> {
        let log = options.log;
        for name in storage.list().await? {
            if name.ends_with(".snap.tmp") {
                storage.remove(&name).await?; // a snapshot cut short by a crash
            }
        }
        let (snapshot, skipped_snapshots) = load_newest(&storage, log).await?;
        for (name, _) in &skipped_snapshots {
            // Set aside so that it no longer counts as one of the kept two.
            storage.rename(name, &format!("{name}.bad")).await?;
        }
        // A shard just re-synced from an upstream's snapshot has no log yet:
        // its log starts where that snapshot ends. Only then: anywhere else
        // a missing log is damage, refused below.
        let names = storage.list().await?;
        let resyncing = names.iter().any(|n| n == RESYNC_MARKER);
        let epoch_floor = names
            .iter()
            .filter_map(|n| parse_epoch_floor(n))
            .max()
            .unwrap_or(0);
        let mut options = options;
        options.own_epoch_max = names
            .iter()
            .filter_map(|n| parse_epoch_name(n, EPOCH_BEGUN_PREFIX))
            .fold(options.own_epoch_max, u64::max);
        let epoch_begun = options.own_epoch_max;
        let origin = snapshot.as_ref().filter(|_| resyncing).map(|s| s.pos);
        let wal = Wal::open_at(storage.clone(), options, origin).await?;
        if resyncing && wal.segment_count() > 0 {
            storage.remove(RESYNC_MARKER).await?;
            storage.sync_dir().await?;
        }
        let resync_pending = resyncing && wal.segment_count() == 0;
        let (mut state, mut pos, name) = match snapshot {
            Some(s) => (s.state, s.pos, Some(s.name)),
            None => (M::default(), wal.first_position(), None),
        };
        if name.is_none() && pos.lsn > 0 {
            // Replaying only the WAL would serve a state missing everything
            // released below it.
            return Err(EngineError::NoBaseForLog { first_lsn: pos.lsn });
        }
        if wal.durable_lsn() < pos.lsn {
            return Err(EngineError::WalBehindSnapshot {
                wal_end: wal.durable_lsn(),
                snapshot_lsn: pos.lsn,
            });
        }
        let mut replayed = 0;
        loop {
            let batch = wal.read(pos, 1 << 20).await?;
            if batch.records.is_empty() {
                break;
            }
            for record in batch.records.iter().filter(|r| r.kind == RecordKind::Data) {
                state.apply(record.lsn, &record.body)?;
                replayed += 1;
            }
            pos = batch.next;
        }
        let report = OpenReport {
            snapshot: name,
            skipped_snapshots,
            replayed,
        };
        Ok(Self {
            storage,
            log,
            report,
            wal,
            state: RefCell::new(state),
            scratch: RefCell::new(Vec::new()),
            snapshotting: std::cell::Cell::new(false),
            resync_pending: std::cell::Cell::new(resync_pending),
            epoch_floor: std::cell::Cell::new(epoch_floor),
            epoch_begun: std::cell::Cell::new(epoch_begun),
        })
    }

    /// The highest epoch its log held before a rewind or a snapshot re-sync
    /// took records away, or that an upstream was seen in (0 if neither):
    /// a new epoch must be above it.
    pub fn epoch_floor(&self) -> u64 {
        self.epoch_floor.get()
    }

    /// The highest epoch this shard began itself (0 if none since it was
    /// created): a log whose epoch is above it holds another node's epoch.
    pub fn epoch_begun(&self) -> u64 {
        self.epoch_begun.get()
    }

    /// Notes that its floor file now says `epoch`.
    pub(crate) fn set_epoch_floor(&self, epoch: u64) {
        self.epoch_floor.set(self.epoch_floor.get().max(epoch));
    }

    /// What opening found.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// Writes a snapshot of the state as it is now, while writes go on;
    /// then keeps the two newest snapshots and releases the WAL below the
    /// older of them. Returns the snapshot's position.
    pub async fn snapshot(&self) -> Result<Expect, EngineError> {
        if self.snapshotting.replace(true) {
            return Err(EngineError::SnapshotInProgress);
        }
        let result = self.snapshot_now_holding(u64::MAX).await;
        self.snapshotting.set(false);
        result
    }

    async fn snapshot_now_holding(&self, hold: u64) -> Result<Expect, EngineError> {
        let pos = self.wal.next_position();
        let frozen = self.state.borrow().clone();
        // Only durable records may be in a snapshot: wait until the log is
        // durable up to `pos` (the flusher writes whatever is staged). Never
        // by appending a record of its own: a replica's log must hold its
        // upstream's records and nothing else, or the next batch of them no
        // longer continues it.
        if pos.lsn > 0 {
            self.wal.durable_past(pos.lsn - 1).await;
        }
        if let Some(error) = self.wal.failure() {
            return Err(error.into());
        }
        if self.wal.durable_lsn() < pos.lsn {
            return Err(WalError::Closed.into());
        }
        write_snapshot(&self.storage, self.log, pos, &frozen).await?;
        let snapshots = list_snapshots(&self.storage).await?;
        for (_, name) in snapshots.iter().skip(SNAPSHOTS_KEPT) {
            self.storage.remove(name).await?;
        }
        // Release only below the older of two good snapshots: with one, it
        // would be the only base, and a damaged one would leave none.
        if snapshots.len() >= SNAPSHOTS_KEPT {
            let (oldest_kept, _) = &snapshots[SNAPSHOTS_KEPT - 1];
            self.wal.release_below((*oldest_kept).min(hold)).await?;
        }
        Ok(pos)
    }

    /// Writes one record whose body `M::apply` understands, at `level`.
    /// The body is applied first, so one that does not decode is refused
    /// and never logged.
    pub async fn write_body(
        &self,
        body: &[u8],
        level: CommitLevel,
    ) -> Result<ShardReceipt, EngineError> {
        self.wal.wait_for_space().await?;
        // Refused before it reaches the state: after `wait_for_space` the log
        // is open, so size is the only reason left for `submit` to fail.
        let max = self.wal.record_body_max();
        if body.len() > max {
            return Err(WalError::TooLarge {
                len: body.len(),
                max,
            }
            .into());
        }
        // No await from here to the submit: the state sees records in LSN order.
        let lsn = self.wal.next_lsn();
        self.state.borrow_mut().apply(lsn, body)?;
        let pending = self.wal.submit(RecordKind::Data, body)?;
        debug_assert_eq!(pending.receipt().lsn, lsn);
        finish(pending, level).await
    }

    /// Starts `epoch` on this shard: later records carry it, and an empty
    /// record of it is made durable now so that it survives a restart.
    pub async fn begin_epoch(&self, epoch: u64) -> Result<ShardReceipt, EngineError> {
        if epoch <= self.epoch_floor() {
            // Held or seen already (the floor may rise while a promotion
            // is under way): never begun twice.
            return Err(WalError::EpochRegressed {
                epoch,
                last: self.epoch_floor(),
            }
            .into());
        }
        // Kept before any record of it: its records are this node's own,
        // and a restart as a replica must never cut them as refetchable.
        // (Left in place if the epoch is then refused: it only makes a
        // recovery stricter.)
        let begun = format!("{EPOCH_BEGUN_PREFIX}{epoch:020}");
        self.storage.create(&begun).await?;
        self.storage.sync_dir().await?;
        self.epoch_begun.set(self.epoch_begun.get().max(epoch));
        self.wal.wait_for_space().await?;
        self.wal.begin_epoch(epoch)?;
        let pending = self.wal.submit(RecordKind::Noop, &[])?;
        let receipt = finish(pending, CommitLevel::Local).await?;
        for name in self.storage.list().await? {
            if parse_epoch_name(&name, EPOCH_BEGUN_PREFIX).is_some_and(|e| e < epoch) {
                self.storage.remove(&name).await?;
            }
        }
        Ok(receipt)
    }

    /// Writes a snapshot and releases the WAL below the older of the two
    /// kept snapshots, but never at or above `hold` (records a replica
    /// still needs). See [`Shard::snapshot`].
    pub async fn snapshot_holding(&self, hold: u64) -> Result<Expect, EngineError> {
        if self.snapshotting.replace(true) {
            return Err(EngineError::SnapshotInProgress);
        }
        let result = self.snapshot_now_holding(hold).await;
        self.snapshotting.set(false);
        result
    }

    /// Runs `f` on the state as it is now (staged writes included).
    pub fn read<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        f(&self.state.borrow())
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

/// The key-value API of a shard holding the default state.
impl<S: Storage + Clone + 'static> Shard<S, KvState> {
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
        self.state
            .borrow_mut()
            .apply_ops(pending.receipt().lsn, ops);
        finish(pending, level).await
    }

    /// Reads `key` and writes what `decide` makes of its current value, as
    /// one atomic step: no other write to this shard comes in between (the
    /// read, the staging and the application share one synchronous step).
    /// `Keep` writes nothing and returns no receipt.
    pub async fn update(
        &self,
        key: &[u8],
        decide: impl FnOnce(Option<&Bytes>) -> Update,
        level: CommitLevel,
    ) -> Result<Option<ShardReceipt>, EngineError> {
        self.wal.wait_for_space().await?;
        let current = self.get(key);
        let value = match decide(current.as_ref()) {
            Update::Keep => return Ok(None),
            Update::Put(value) => Some(value),
            Update::Delete => None,
        };
        let op = match &value {
            Some(value) => Op::Put { key, value },
            None => Op::Delete { key },
        };
        let pending = {
            let mut scratch = self.scratch.borrow_mut();
            encode_batch(&mut scratch, std::slice::from_ref(&op))?;
            self.wal.submit(RecordKind::Data, &scratch)?
        };
        self.state
            .borrow_mut()
            .apply_ops(pending.receipt().lsn, std::slice::from_ref(&op));
        finish(pending, level).await.map(Some)
    }

    /// Takes records an upstream sent (WAL bytes exactly as on its disk):
    /// checks that they continue this shard's log and that every data body
    /// decodes, stages the same bytes in the log and applies them, in one
    /// synchronous step, then waits for `level`. A batch that fails a check
    /// changes nothing. `None` for no bytes.
    pub async fn replicate(
        &self,
        records: &[u8],
        level: CommitLevel,
    ) -> Result<Option<ShardReceipt>, EngineError> {
        use zerocopy::FromBytes;
        self.wal.wait_for_space().await?;
        // Bodies first: the log must not take a record the state cannot.
        let mut batches = Vec::new();
        let mut at = 0;
        while at < records.len() {
            let cut = || {
                EngineError::Wal(WalError::Rejected {
                    lsn: self.wal.next_lsn() + at as u64,
                    error: crate::format::FormatError::Overrun {
                        lsn: self.wal.next_lsn() + at as u64,
                    },
                })
            };
            let (header, rest) =
                crate::format::RecordHeader::ref_from_prefix(&records[at..]).map_err(|_| cut())?;
            let body = rest.get(..header.length.get() as usize).ok_or_else(cut)?;
            if header.kind == RecordKind::Data as u8 {
                batches.push((header.lsn.get(), crate::state::decode_batch(body)?));
            }
            at += crate::format::RECORD_HEADER_BYTES + body.len();
        }
        let Some(pending) = self.wal.submit_raw(records)? else {
            return Ok(None);
        };
        {
            let mut state = self.state.borrow_mut();
            for (lsn, ops) in &batches {
                state.apply_ops(*lsn, ops);
            }
        }
        let receipt = finish(pending, level).await?;
        if level == CommitLevel::Local && self.resync_pending.replace(false) {
            // The log continuing the installed snapshot is on disk now.
            self.storage.remove(RESYNC_MARKER).await?;
            self.storage.sync_dir().await?;
        }
        Ok(Some(receipt))
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
}

/// Waits for what `level` asks of a staged record and makes its receipt.
async fn finish(
    pending: crate::wal::Pending,
    level: CommitLevel,
) -> Result<ShardReceipt, EngineError> {
    let receipt = pending.receipt();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_floor_name_counts() {
        assert_eq!(
            parse_epoch_floor("epoch-floor-00000000000000000007"),
            Some(7)
        );
        for name in [
            "epoch-floor-7",
            "epoch-floor-0000000000000000000x",
            "epoch-floor-000000000000000000007",
            "epoch-floor-00000000000000000007.tmp",
            "00000000000000000000.wal",
            "RESYNC",
        ] {
            assert_eq!(parse_epoch_floor(name), None, "{name}");
        }
    }
}
