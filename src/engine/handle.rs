//! The multi-core engine and its `Send + Sync` handle.
//!
//! `Engine::open` starts one glommio executor per core (a thread, pinned),
//! each owning the shards `i` with `i % executors == core`: their WAL, state
//! and snapshots. The handle routes each request to the owner of its shard
//! (`crc32c(key) % shard_count`, fixed when the directory is created)
//! through a lock-free mailbox (`mailbox.rs`); the reply comes back on a
//! oneshot channel. Nothing is shared between cores but those, and the path
//! takes no lock. The handle's futures
//! are runtime-agnostic: they work on tokio, inside glommio, or on a plain
//! thread with [`block_on`].
//!
//! The data directory holds `LOCK` (an exclusive `flock`, so a second
//! process cannot open it), `meta.json` (cluster id and shard count, fixed
//! at creation) and one `shard-NNNN/` directory per shard.

use glommio::ExecutorJoinHandle as JoinHandle;
use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use futures_channel::oneshot;

use crate::format::Expect;
use crate::format::LogId;
use crate::io::{DirectIo, DmaStorage, SyncMode};
use crate::state::Op;
use crate::wal::{ReadBatch, WalError, WalOptions, WalStats};

use super::mailbox;
use super::{CommitLevel, EngineError, Options, Shard, ShardReceipt, Update};

pub use futures_lite::future::block_on;

/// One operation of a batch, owned so it can cross threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    Put(Bytes, Bytes),
    Delete(Bytes),
}

impl BatchOp {
    fn key(&self) -> &[u8] {
        match self {
            BatchOp::Put(k, _) | BatchOp::Delete(k) => k,
        }
    }
}

/// What a batch that touches several shards may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchAtomicity {
    /// All or nothing: a batch spanning shards is refused.
    Atomic,
    /// Atomic within each shard only; the caller accepts that a crash may
    /// keep one shard's part and lose another's.
    PerShard,
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;
type Decide = Box<dyn FnOnce(Option<&Bytes>) -> Update + Send>;

/// One shard's figures, for status pages and metrics.
#[derive(Debug, Clone)]
pub struct ShardStats {
    pub shard: u32,
    /// The executor (core) that owns it.
    pub executor: u32,
    /// The epoch its new records carry.
    pub epoch: u64,
    /// The highest epoch its log held before a rewind or a snapshot re-sync
    /// took records away, or that its upstream was seen in (0 if neither):
    /// no epoch at or below it is begun again, though `epoch` may be below
    /// it until the log catches up.
    pub epoch_floor: u64,
    /// The highest epoch this shard began itself (a promotion or an
    /// election; 0 if none since it was created).
    pub epoch_begun: u64,
    /// Everything below is durable.
    pub durable_lsn: u64,
    /// Where the next record goes: the head of the log.
    pub next_lsn: u64,
    /// The chain value at `next_lsn` (the last record's checksum): two
    /// shards with equal `(next_lsn, chain)` hold the same log.
    pub chain: u32,
    /// First LSN still held by the log (retention).
    pub first_lsn: u64,
    /// `(epoch, first lsn)` of each epoch held, oldest first.
    pub epochs: Vec<(u64, u64)>,
    pub segments: usize,
    pub keys: usize,
    pub wal: WalStats,
    /// Set once the shard's WAL failed; it serves nothing until reopened.
    pub failure: Option<String>,
}

/// An answer that is on its way: the request was sent when this was made,
/// so requests reach each shard in the order they were made.
pub type Answer<T> = Pin<Box<dyn Future<Output = Result<T, EngineError>> + Send + 'static>>;

enum Request {
    Write {
        shard: u32,
        ops: Vec<BatchOp>,
        level: CommitLevel,
        reply: Reply<ShardReceipt>,
    },
    Get {
        shard: u32,
        key: Bytes,
        reply: Reply<Option<Bytes>>,
    },
    Scan {
        shard: u32,
        start: Bytes,
        end: Option<Bytes>,
        prefix: bool,
        limit: usize,
        reply: Reply<Vec<(Bytes, Bytes)>>,
    },
    Update {
        shard: u32,
        key: Bytes,
        decide: Decide,
        level: CommitLevel,
        reply: Reply<Option<ShardReceipt>>,
    },
    Snapshot {
        shard: u32,
        /// Release no WAL at or above this LSN.
        hold: u64,
        reply: Reply<u64>,
    },
    /// Close the shard, change its files (install an upstream's snapshot,
    /// or rewind its log) and open it again.
    Swap {
        shard: u32,
        swap: Swap,
        reply: Reply<Expect>,
    },
    Replicate {
        shard: u32,
        records: Bytes,
        level: CommitLevel,
        reply: Reply<Option<ShardReceipt>>,
    },
    BeginEpoch {
        shard: u32,
        epoch: u64,
        reply: Reply<ShardReceipt>,
    },
    RaiseEpochFloor {
        shard: u32,
        epoch: u64,
        reply: Reply<()>,
    },
    ReadLog {
        shard: u32,
        from: Expect,
        max_bytes: usize,
        /// How long to wait for a record when none is durable past `from`.
        wait: std::time::Duration,
        reply: Reply<ReadBatch>,
    },
    Stats {
        reply: Reply<Vec<ShardStats>>,
    },
    /// [`Engine::cut`]: the executor says it is `frozen` and takes no
    /// request until `release` brings where to send its shards' heads
    /// (read as it resumes); a dropped `release` resumes it too.
    Freeze {
        frozen: oneshot::Sender<()>,
        release: oneshot::Receiver<oneshot::Sender<Vec<(u32, Expect)>>>,
    },
    /// Runs on the executor's thread (where it may spawn local tasks).
    Run(Box<dyn FnOnce() + Send>),
    Close {
        reply: Reply<()>,
    },
}

/// Stored in `meta.json`: what is fixed when the directory is created.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    format: u32,
    cluster_id: String,
    shard_count: u32,
}

struct Inner {
    shard_count: u32,
    executors: Vec<mailbox::Sender<Request>>,
    default_level: CommitLevel,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The data-directory lock; released by `close`.
    lock: Mutex<Option<File>>,
    dir: PathBuf,
    cluster_id: [u8; 16],
    /// Held while a cut posts its `Freeze` requests: every mailbox then
    /// sees the cuts in one order, so two at once cannot each wait for an
    /// executor the other froze.
    cutting: Mutex<()>,
}

/// A handle to an open engine. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Opens (creating if needed) the engine in `dir`.
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Engine, EngineError> {
        options.check().map_err(|e| EngineError::Options(e.0))?;
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::Meta(format!("{}: {e}", dir.display())))?;
        let lock = lock_dir(&dir)?;
        let executors = options.executors();
        let meta = load_or_create_meta(&dir, &options, executors)?;
        let cluster_id = parse_cluster_id(&meta.cluster_id)?;
        let log_id = |shard| LogId { cluster_id, shard };
        let allowed = allowed_cpus();
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for core in 0..executors {
            let (tx, rx) = mailbox::mailbox::<Request>();
            senders.push(tx);
            let shards: Vec<(u32, PathBuf, WalOptions)> = (0..meta.shard_count)
                .filter(|s| s % executors == core)
                .map(|s| {
                    let mut wal = WalOptions::new(log_id(s));
                    // The shard's epoch is the one its log carries.
                    wal.epoch = 0;
                    wal.segment_bytes = options.segment_bytes;
                    wal.tail_refetchable = options.tail_refetchable;
                    wal.batch_bytes_max = options.batch_bytes_max;
                    wal.writes_in_flight = options.wal_writes_in_flight;
                    wal.staged_bytes_max = wal.staged_bytes_max.max(options.batch_bytes_max);
                    (s, dir.join(format!("shard-{s:04}")), wal)
                })
                .collect();
            let placement = if options.pin_executors {
                glommio::Placement::Fixed(allowed[core as usize % allowed.len()])
            } else {
                glommio::Placement::Unbound
            };
            let policy = if options.allow_buffered_io {
                DirectIo::AllowBuffered
            } else {
                DirectIo::Require
            };
            let sync_mode = options.sync_mode;
            let ready = ready_tx.clone();
            let mut builder =
                glommio::LocalExecutorBuilder::new(placement).name(&format!("tidewal-{core}"));
            let spin_us = options.effective_spin_us();
            if spin_us > 0 {
                builder = builder.spin_before_park(std::time::Duration::from_micros(spin_us));
            }
            let thread = builder
                .spawn(move || run_executor(core, shards, policy, sync_mode, rx, ready))
                .map_err(|e| EngineError::Meta(format!("starting executor {core}: {e}")))?;
            threads.push(thread);
        }
        drop(ready_tx);
        let mut failure = None;
        for _ in 0..executors {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => failure = failure.or(Some(EngineError::Closed)),
            }
        }
        let engine = Engine {
            inner: Arc::new(Inner {
                shard_count: meta.shard_count,
                executors: senders,
                default_level: options.commit_level,
                threads: Mutex::new(threads),
                lock: Mutex::new(Some(lock)),
                dir: dir.clone(),
                cluster_id,
                cutting: Mutex::new(()),
            }),
        };
        if let Some(e) = failure {
            let _ = block_on(engine.close());
            return Err(e);
        }
        Ok(engine)
    }

    /// Number of logical shards (fixed at creation).
    pub fn shard_count(&self) -> u32 {
        self.inner.shard_count
    }

    /// The shard that owns `key`.
    pub fn shard_of(&self, key: &[u8]) -> u32 {
        crate::format::crc32c(key) % self.inner.shard_count
    }

    fn route(&self, shard: u32) -> &mailbox::Sender<Request> {
        &self.inner.executors[(shard % self.inner.executors.len() as u32) as usize]
    }

    /// Sends a request to the owner of `shard`; the receiver yields its reply.
    fn send<T>(
        &self,
        shard: u32,
        make: impl FnOnce(Reply<T>) -> Request,
    ) -> Result<oneshot::Receiver<Result<T, EngineError>>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.route(shard)
            .send(make(tx))
            .map_err(|_| EngineError::Closed)?;
        Ok(rx)
    }

    /// Sends now; the answer is awaited later.
    fn answer<T: Send + 'static>(
        &self,
        shard: u32,
        make: impl FnOnce(Reply<T>) -> Request,
    ) -> Answer<T> {
        let sent = self.send(shard, make);
        Box::pin(async move { sent?.await.map_err(|_| EngineError::Closed)? })
    }

    /// The commit level writes get unless they ask for another.
    pub fn default_level(&self) -> CommitLevel {
        self.inner.default_level
    }

    /// Writes `value` under `key` at the engine's default commit level.
    pub fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Answer<ShardReceipt> {
        self.put_at(key, value, self.inner.default_level)
    }

    /// Writes `value` under `key` at `level`. The request is on its way when
    /// this returns (so writes made one after the other reach their shard in
    /// that order); the answer resolves once `level` is reached.
    pub fn put_at(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        level: CommitLevel,
    ) -> Answer<ShardReceipt> {
        self.write_one(BatchOp::Put(key.into(), value.into()), level)
    }

    /// Deletes `key` at the engine's default commit level.
    pub fn delete(&self, key: impl Into<Bytes>) -> Answer<ShardReceipt> {
        self.delete_at(key, self.inner.default_level)
    }

    /// Deletes `key` at `level`.
    pub fn delete_at(&self, key: impl Into<Bytes>, level: CommitLevel) -> Answer<ShardReceipt> {
        self.write_one(BatchOp::Delete(key.into()), level)
    }

    fn write_one(&self, op: BatchOp, level: CommitLevel) -> Answer<ShardReceipt> {
        let shard = self.shard_of(op.key());
        let ops = vec![op];
        self.answer(shard, |reply| Request::Write {
            shard,
            ops,
            level,
            reply,
        })
    }

    pub fn get(&self, key: impl Into<Bytes>) -> Answer<Option<Bytes>> {
        let key = key.into();
        let shard = self.shard_of(&key);
        self.answer(shard, |reply| Request::Get { shard, key, reply })
    }

    /// Reads `key` and writes what `decide` makes of its value, atomically
    /// (read-modify-write: counters, compare-and-set). `decide` runs on the
    /// shard's executor. Returns the receipt, or `None` when it chose
    /// [`Update::Keep`].
    pub fn update_at(
        &self,
        key: impl Into<Bytes>,
        level: CommitLevel,
        decide: impl FnOnce(Option<&Bytes>) -> Update + Send + 'static,
    ) -> Answer<Option<ShardReceipt>> {
        let key = key.into();
        let shard = self.shard_of(&key);
        let decide: Decide = Box::new(decide);
        self.answer(shard, |reply| Request::Update {
            shard,
            key,
            decide,
            level,
            reply,
        })
    }

    /// Writes several operations. With [`BatchAtomicity::Atomic`] they must
    /// all fall in one shard, and are then all-or-nothing; otherwise each
    /// shard's part is atomic on its own. One receipt per shard touched.
    pub fn batch(&self, ops: Vec<BatchOp>, atomicity: BatchAtomicity) -> Answer<Vec<ShardReceipt>> {
        self.batch_at(ops, atomicity, self.inner.default_level)
    }

    /// [`Engine::batch`] at `level`.
    pub fn batch_at(
        &self,
        ops: Vec<BatchOp>,
        atomicity: BatchAtomicity,
        level: CommitLevel,
    ) -> Answer<Vec<ShardReceipt>> {
        let mut by_shard: BTreeMap<u32, Vec<BatchOp>> = BTreeMap::new();
        for op in ops {
            by_shard
                .entry(self.shard_of(op.key()))
                .or_default()
                .push(op);
        }
        if by_shard.len() > 1 && atomicity == BatchAtomicity::Atomic {
            let shards = by_shard.len();
            return Box::pin(async move { Err(EngineError::CrossShardBatch { shards }) });
        }
        // Every shard's part is sent before any reply is awaited, so one
        // shard's failure does not keep the others from getting theirs.
        let waits: Vec<_> = by_shard
            .into_iter()
            .map(|(shard, ops)| {
                self.send(shard, |reply| Request::Write {
                    shard,
                    ops,
                    level,
                    reply,
                })
            })
            .collect();
        Box::pin(async move {
            let mut receipts = Vec::new();
            let mut failure = None;
            for rx in waits {
                let result = match rx {
                    Ok(rx) => rx.await.map_err(|_| EngineError::Closed).and_then(|r| r),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(receipt) => receipts.push(receipt),
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
            match failure {
                Some(e) => Err(e),
                None => Ok(receipts),
            }
        })
    }

    /// Up to `limit` entries with `start <= key < end`, in key order, from
    /// every shard.
    pub fn scan(
        &self,
        start: impl Into<Bytes>,
        end: Option<Bytes>,
        limit: usize,
    ) -> Answer<Vec<(Bytes, Bytes)>> {
        self.scan_all(start.into(), end, false, limit)
    }

    /// Up to `limit` entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(
        &self,
        prefix: impl Into<Bytes>,
        limit: usize,
    ) -> Answer<Vec<(Bytes, Bytes)>> {
        self.scan_all(prefix.into(), None, true, limit)
    }

    fn scan_all(
        &self,
        start: Bytes,
        end: Option<Bytes>,
        prefix: bool,
        limit: usize,
    ) -> Answer<Vec<(Bytes, Bytes)>> {
        // Every shard scans at once; the replies are gathered afterwards.
        let waits: Vec<_> = (0..self.inner.shard_count)
            .map(|shard| {
                let (start, end) = (start.clone(), end.clone());
                self.send(shard, |reply| Request::Scan {
                    shard,
                    start,
                    end,
                    prefix,
                    limit,
                    reply,
                })
            })
            .collect();
        Box::pin(async move {
            let mut all = Vec::new();
            for rx in waits {
                all.extend(rx?.await.map_err(|_| EngineError::Closed)??);
            }
            // Each shard's part is sorted and at most `limit` long: the first
            // `limit` of the merge are the answer.
            all.sort_by(|a, b| a.0.cmp(&b.0));
            all.truncate(limit);
            Ok(all)
        })
    }

    /// Stages and applies records an upstream sent for `shard` (WAL bytes
    /// as on its disk), after checking that they continue this shard's log;
    /// resolves once `level` is reached. See [`Shard::replicate`].
    pub fn replicate_at(
        &self,
        shard: u32,
        records: Bytes,
        level: CommitLevel,
    ) -> Answer<Option<ShardReceipt>> {
        self.answer(shard, |reply| Request::Replicate {
            shard,
            records,
            level,
            reply,
        })
    }

    /// Starts a new epoch on every shard, one above the highest any shard
    /// has seen (its log's, one a rewind or re-sync took away, or one its
    /// upstream was seen in), and
    /// makes it durable: what a replica promoted to primary does, so that
    /// records of the primary it replaces are refused from then on. Returns
    /// the new epoch.
    pub async fn begin_epoch(&self) -> Result<u64, EngineError> {
        // A shard refuses an epoch at or below what it has seen, which can
        // rise meanwhile (a frame of a new epoch still being taken): then
        // again, above it. Shards that began the refused one move past it.
        let mut tries = 0;
        loop {
            let stats = self.stats().await?;
            let seen = |s: &ShardStats| s.epoch.max(s.epoch_floor);
            let epoch = stats
                .iter()
                .map(seen)
                .max()
                .unwrap_or(0)
                .checked_add(1)
                .ok_or_else(|| {
                    EngineError::Meta("no epoch is left above the highest seen".into())
                })?;
            let waits: Vec<_> = (0..self.inner.shard_count)
                .map(|shard| {
                    self.answer(shard, |reply| Request::BeginEpoch {
                        shard,
                        epoch,
                        reply,
                    })
                })
                .collect();
            let mut result = Ok(epoch);
            for wait in waits {
                if let Err(e) = wait.await {
                    result = result.and(Err(e));
                }
            }
            match result {
                Err(EngineError::Wal(WalError::EpochRegressed { .. })) if tries < 3 => tries += 1,
                other => return other,
            }
        }
    }

    /// Keeps, durably, that `shard` has seen `epoch` (a replica seeing its
    /// upstream in a new epoch): a later [`Engine::begin_epoch`] begins
    /// above it, even if no record of that epoch reached this log. Requests
    /// made after this one see it at once; the answer comes once it is
    /// durable. Does nothing if the shard's floor is already at or above it.
    pub fn raise_epoch_floor(&self, shard: u32, epoch: u64) -> Answer<()> {
        self.answer(shard, |reply| Request::RaiseEpochFloor {
            shard,
            epoch,
            reply,
        })
    }

    /// Durable records of `shard` from `from` on, about `max_bytes` of them
    /// (what a replication upstream sends; each carries its bytes as on
    /// disk).
    pub fn read_log(&self, shard: u32, from: Expect, max_bytes: usize) -> Answer<ReadBatch> {
        self.read_log_wait(shard, from, max_bytes, std::time::Duration::ZERO)
    }

    /// [`Engine::read_log`], but when nothing is durable past `from` it
    /// waits, up to `wait`, for a record to become durable: a replication
    /// sender learns of a commit as soon as it is made, without polling.
    pub fn read_log_wait(
        &self,
        shard: u32,
        from: Expect,
        max_bytes: usize,
        wait: std::time::Duration,
    ) -> Answer<ReadBatch> {
        self.answer(shard, |reply| Request::ReadLog {
            shard,
            from,
            max_bytes,
            wait,
            reply,
        })
    }

    /// A consistent cut: each shard's head (where its next record goes),
    /// such that every write acknowledged before any record inside the cut
    /// was staged is inside it too. Shards on different cores have no
    /// common clock, so the heads are not read one after another: first
    /// every executor stops taking requests, then each reads its heads as
    /// it resumes. A write on one shard staged before its executor stopped
    /// was asked for before then, so whatever it followed (a write answered
    /// before it was asked for) was staged before every executor had
    /// stopped, and is below its shard's head, read later. Writes wait
    /// meanwhile for about one message to and from every core. (A batch
    /// written with [`BatchAtomicity::PerShard`] is one write per shard:
    /// a cut may fall between its parts.)
    pub async fn cut(&self) -> Result<Vec<Expect>, EngineError> {
        let mut frozen = Vec::new();
        let mut releases = Vec::new();
        let order = self.inner.cutting.lock().unwrap_or_else(|e| e.into_inner());
        for tx in &self.inner.executors {
            let (frozen_tx, frozen_rx) = oneshot::channel();
            let (release_tx, release_rx) = oneshot::channel();
            tx.send(Request::Freeze {
                frozen: frozen_tx,
                release: release_rx,
            })
            .map_err(|_| EngineError::Closed)?;
            frozen.push(frozen_rx);
            releases.push(release_tx);
        }
        drop(order);
        // On an error here `releases` is dropped: every executor resumes.
        for rx in frozen {
            rx.await.map_err(|_| EngineError::Closed)?;
        }
        let mut heads = Vec::new();
        for release in releases {
            let (tx, rx) = oneshot::channel();
            let _ = release.send(tx);
            heads.push(rx);
        }
        let mut all = Vec::new();
        for rx in heads {
            all.extend(rx.await.map_err(|_| EngineError::Closed)?);
        }
        all.sort_by_key(|(shard, _)| *shard);
        Ok(all.into_iter().map(|(_, head)| head).collect())
    }

    /// Every shard's figures, in shard order.
    pub async fn stats(&self) -> Result<Vec<ShardStats>, EngineError> {
        let mut waits = Vec::new();
        for tx in &self.inner.executors {
            let (reply, rx) = oneshot::channel();
            tx.send(Request::Stats { reply })
                .map_err(|_| EngineError::Closed)?;
            waits.push(rx);
        }
        let mut all = Vec::new();
        for rx in waits {
            all.extend(rx.await.map_err(|_| EngineError::Closed)??);
        }
        all.sort_by_key(|s| s.shard);
        Ok(all)
    }

    /// The id generated when the data directory was created (in every
    /// segment and snapshot header of its logs).
    pub fn cluster_id(&self) -> [u8; 16] {
        self.inner.cluster_id
    }

    /// Number of executors (cores).
    pub fn executor_count(&self) -> u32 {
        self.inner.executors.len() as u32
    }

    /// Runs `f(executor)` on every executor's thread, where it may spawn
    /// tasks with `glommio::spawn_local` (a server's listeners, say). Tasks
    /// still running when the engine closes are dropped with it.
    pub fn run_on_each(&self, f: impl Fn(u32) + Send + Sync + 'static) -> Result<(), EngineError> {
        let f = Arc::new(f);
        for (core, tx) in self.inner.executors.iter().enumerate() {
            let f = f.clone();
            tx.send(Request::Run(Box::new(move || f(core as u32))))
                .map_err(|_| EngineError::Closed)?;
        }
        Ok(())
    }

    /// Snapshots every shard; returns each shard's snapshot LSN.
    pub async fn snapshot(&self) -> Result<Vec<u64>, EngineError> {
        let mut lsns = Vec::new();
        for shard in 0..self.inner.shard_count {
            lsns.push(
                self.answer(shard, |reply| Request::Snapshot {
                    shard,
                    hold: u64::MAX,
                    reply,
                })
                .await?,
            );
        }
        Ok(lsns)
    }

    /// Snapshots one shard and releases its WAL below the older of its two
    /// kept snapshots, but not at or above `hold` (what replicas still
    /// need). Returns the snapshot's LSN.
    pub fn snapshot_shard(&self, shard: u32, hold: u64) -> Answer<u64> {
        self.answer(shard, |reply| Request::Snapshot { shard, hold, reply })
    }

    /// The directory holding `shard`'s log and snapshots.
    pub fn shard_dir(&self, shard: u32) -> PathBuf {
        self.inner.dir.join(format!("shard-{shard:04}"))
    }

    /// Replaces `shard` with the snapshot in `file` (a verified copy of an
    /// upstream's snapshot at position `expect`): the shard's log and
    /// snapshots are moved aside into `quarantine-<unix ms>/` in its
    /// directory (kept, never deleted), the snapshot is installed, and the
    /// shard's log continues from its position. What a replica does when
    /// its upstream no longer holds the records it needs, or when it is
    /// re-synced after a divergence. Returns the shard's new position.
    pub fn install_snapshot(&self, shard: u32, file: PathBuf, expect: Expect) -> Answer<Expect> {
        self.answer(shard, |reply| Request::Swap {
            shard,
            swap: Swap::Install { file, expect },
            reply,
        })
    }

    /// Rewinds `shard`'s log to `lsn`, which must be where one of its
    /// records ends: the records after it, and the snapshots taken past it,
    /// are moved aside into `quarantine-<unix ms>/` in the shard's directory
    /// (with a copy of the segment holding the cut), and the shard reopens
    /// with the state rebuilt from a snapshot at or below `lsn` and its log.
    /// What a replica does when its log parts from its upstream's at a known
    /// point: only the divergent suffix is then fetched again. Refused, with
    /// nothing changed, when `lsn` is not a record boundary or nothing to
    /// rebuild the state from remains (then only a snapshot re-sync helps).
    /// Returns the shard's new position.
    pub fn rewind(&self, shard: u32, lsn: u64) -> Answer<Expect> {
        self.answer(shard, |reply| Request::Swap {
            shard,
            swap: Swap::Rewind { lsn },
            reply,
        })
    }

    /// Makes everything durable, stops the executors and waits for them.
    /// Other clones of the handle get `Closed` afterwards.
    pub async fn close(&self) -> Result<(), EngineError> {
        let mut result = Ok(());
        for tx in &self.inner.executors {
            let (reply, rx) = oneshot::channel();
            if tx.send(Request::Close { reply }).is_err() {
                continue; // closed before
            }
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                // The executor died (a panic) before answering: what it had
                // staged may be lost, and the caller must know.
                Err(_) => {
                    result = Err(EngineError::Meta(
                        "an executor stopped before closing its shards".into(),
                    ))
                }
            }
        }
        // Joining blocks: do it on a thread of its own, not the caller's.
        let inner = self.inner.clone();
        let (done, joined) = oneshot::channel();
        std::thread::spawn(move || {
            let _ = done.send(inner.join_and_unlock());
        });
        let joined = joined.await.unwrap_or(Ok(()));
        result.and(joined)
    }
}

impl Inner {
    /// Joins the executor threads, then releases the directory lock: another
    /// open may proceed only once nothing of this one writes any more.
    fn join_and_unlock(&self) -> Result<(), EngineError> {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let mut result = Ok(());
        for t in threads {
            if t.join().is_err() {
                result = Err(EngineError::Meta("an executor thread panicked".into()));
            }
        }
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()).take());
        result
    }
}

impl Drop for Inner {
    /// The last handle dropped without `close`: close anyway (flushing what
    /// was staged) and keep the lock until the executors are gone.
    fn drop(&mut self) {
        for tx in &self.executors {
            let (reply, rx) = oneshot::channel();
            if tx.send(Request::Close { reply }).is_ok() {
                let _ = block_on(rx);
            }
        }
        let _ = self.join_and_unlock();
    }
}

/// The CPUs this process may run on (a container's cpuset need not start at 0).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set we own.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
            == 0;
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|cpu| ok && unsafe { libc::CPU_ISSET(*cpu, &set) })
        .collect();
    if cpus.is_empty() { vec![0] } else { cpus }
}

/// Takes an exclusive `flock` on `dir/LOCK`, held as long as the file is open.
fn lock_dir(dir: &Path) -> Result<File, EngineError> {
    let path = dir.join("LOCK");
    crate::io::lock_dir(dir)
        .map_err(|e| EngineError::Meta(format!("{}: {e}", path.display())))?
        .ok_or_else(|| EngineError::Locked(dir.display().to_string()))
}

fn load_or_create_meta(dir: &Path, options: &Options, executors: u32) -> Result<Meta, EngineError> {
    let path = dir.join("meta.json");
    let bad = |e: String| EngineError::Meta(format!("{}: {e}", path.display()));
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let meta: Meta = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if meta.format != 1 || meta.shard_count == 0 || meta.cluster_id.len() != 32 {
            return Err(bad("unknown format or bad fields".into()));
        }
        if options.shard_count != 0 && options.shard_count != meta.shard_count {
            tracing::warn!(
                asked = options.shard_count,
                stored = meta.shard_count,
                "shard_count is fixed when the data directory is created; using the stored one"
            );
        }
        return Ok(meta);
    }
    let shard_count = if options.shard_count > 0 {
        options.shard_count
    } else {
        executors
    };
    let meta = Meta {
        format: 1,
        cluster_id: new_cluster_id(),
        shard_count,
    };
    let tmp = dir.join("meta.json.tmp");
    let text = serde_json::to_string_pretty(&meta).map_err(|e| bad(e.to_string()))?;
    std::fs::write(&tmp, text).map_err(|e| bad(e.to_string()))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| bad(e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| bad(e.to_string()))?;
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| bad(e.to_string()))?;
    Ok(meta)
}

/// 16 bytes from the clock, the process id and a counter, as hex.
fn new_cluster_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mixed = nanos ^ ((std::process::id() as u128) << 64) ^ 0x7469_6465_7761_6c00;
    format!(
        "{:032x}",
        mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    )
}

fn parse_cluster_id(hex: &str) -> Result<[u8; 16], EngineError> {
    u128::from_str_radix(hex, 16)
        .map(u128::to_be_bytes)
        .map_err(|_| {
            EngineError::Meta(format!(
                "meta.json: cluster_id {hex:?} is not 32 hex digits"
            ))
        })
}

/// The body of one executor thread: open its shards, then serve requests,
/// each in its own task so that concurrent writes share group commits.
async fn run_executor(
    core: u32,
    shards: Vec<(u32, PathBuf, WalOptions)>,
    policy: DirectIo,
    sync_mode: SyncMode,
    rx: mailbox::Receiver<Request>,
    ready: std::sync::mpsc::Sender<Result<(), EngineError>>,
) {
    let mut owned: BTreeMap<u32, Rc<Shard<DmaStorage>>> = BTreeMap::new();
    let places: BTreeMap<u32, (PathBuf, WalOptions)> = shards
        .iter()
        .map(|(id, dir, wal)| (*id, (dir.clone(), wal.clone())))
        .collect();
    for (id, dir, wal) in shards {
        let opened = match finish_install(&dir) {
            Err(e) => Err(e),
            Ok(()) => match DmaStorage::open(&dir, policy).await {
                Ok(storage) => Shard::open(storage.with_sync_mode(sync_mode), wal).await,
                Err(e) => Err(e.into()),
            },
        };
        match opened {
            Ok(shard) => {
                owned.insert(id, Rc::new(shard));
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        }
    }
    let _ = ready.send(Ok(()));
    // Engine::open waits until every executor reported or hung up.
    drop(ready);
    // Shared with the request tasks, so a request costs a reference count,
    // not a copy of the map; a swap copies it if requests still hold it.
    let mut owned = Rc::new(owned);
    let in_flight = Rc::new(std::cell::Cell::new(0usize));
    while let Some(request) = rx.recv().await {
        let request = match request {
            Request::Close { reply } => {
                let _ = reply.send(close_all(unshared(owned), &in_flight).await);
                return;
            }
            Request::Run(f) => {
                f();
                continue;
            }
            Request::Swap { shard, swap, reply } => {
                let place = places.get(&shard).cloned();
                let result = match place {
                    Some((dir, wal)) => {
                        let opened = Opening {
                            dir,
                            wal,
                            policy,
                            sync_mode,
                        };
                        swap_shard(Rc::make_mut(&mut owned), shard, swap, opened, &in_flight).await
                    }
                    None => Err(EngineError::Closed),
                };
                let _ = reply.send(result);
                continue;
            }
            Request::RaiseEpochFloor {
                shard,
                epoch,
                reply,
            } => {
                match (owned.get(&shard), places.get(&shard)) {
                    (Some(s), Some((dir, _))) if epoch > s.epoch_floor() => {
                        // In memory at once (a begin_epoch from now on sees
                        // it); the file on glommio's blocking thread, so
                        // that this executor's shards go on meanwhile.
                        s.set_epoch_floor(epoch);
                        let dir = dir.clone();
                        glommio::spawn_local(async move {
                            let written = glommio::executor()
                                .spawn_blocking(move || raise_epoch_floor(&dir, epoch))
                                .await
                                .map_err(|e| {
                                    EngineError::Meta(format!(
                                        "keeping shard {shard}'s epoch {epoch}: {e}"
                                    ))
                                });
                            let _ = reply.send(written);
                        })
                        .detach();
                    }
                    (Some(_), Some(_)) => {
                        let _ = reply.send(Ok(()));
                    }
                    _ => {
                        let _ = reply.send(Err(EngineError::Closed));
                    }
                }
                continue;
            }
            Request::Freeze { frozen, release } => {
                let _ = frozen.send(());
                if let Ok(heads) = release.await {
                    let _ = heads.send(
                        owned
                            .iter()
                            .map(|(id, shard)| (*id, shard.wal().next_position()))
                            .collect(),
                    );
                }
                continue;
            }
            Request::Stats { reply } => {
                let _ = reply.send(Ok(owned
                    .iter()
                    .map(|(id, shard)| shard_stats(*id, core, shard))
                    .collect()));
                continue;
            }
            other => other,
        };
        let shards = owned.clone();
        let counter = in_flight.clone();
        counter.set(counter.get() + 1);
        glommio::spawn_local(async move {
            serve(&shards, request).await;
            // Before the count: close_all finds the map unshared once it is 0.
            drop(shards);
            counter.set(counter.get() - 1);
        })
        .detach();
    }
    // Every handle is gone without a close: close anyway, so that what was
    // staged at the memory level still reaches the disk.
    let _ = close_all(unshared(owned), &in_flight).await;
}

/// The executor's shards, as a map of its own (a copy while requests still
/// hold the shared one; close_all waits for them).
fn unshared(
    owned: Rc<BTreeMap<u32, Rc<Shard<DmaStorage>>>>,
) -> BTreeMap<u32, Rc<Shard<DmaStorage>>> {
    Rc::try_unwrap(owned).unwrap_or_else(|shared| (*shared).clone())
}

/// How a shard is opened.
struct Opening {
    dir: PathBuf,
    wal: WalOptions,
    policy: DirectIo,
    sync_mode: SyncMode,
}

/// What replaces a closed shard's files.
enum Swap {
    /// See [`Engine::install_snapshot`].
    Install { file: PathBuf, expect: Expect },
    /// See [`Engine::rewind`].
    Rewind { lsn: u64 },
}

/// Closes the shard, changes its files as `swap` says and opens it again
/// (on whatever its directory holds, if the change failed part way).
async fn swap_shard(
    owned: &mut BTreeMap<u32, Rc<Shard<DmaStorage>>>,
    shard: u32,
    swap: Swap,
    opening: Opening,
    in_flight: &std::cell::Cell<usize>,
) -> Result<Expect, EngineError> {
    while in_flight.get() > 0 {
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
    let old = owned.remove(&shard).ok_or(EngineError::Closed)?;
    // Before any record is taken away, the highest epoch the log held is
    // kept: a later promotion must begin an epoch above it.
    let held = old.wal().next_position().epoch;
    if held > old.epoch_floor()
        && let Err(e) = raise_epoch_floor(&opening.dir, held)
    {
        owned.insert(shard, old);
        return Err(EngineError::Meta(format!(
            "re-sync of shard {shard}: keeping its epoch {held}: {e}"
        )));
    }
    match Rc::try_unwrap(old) {
        Ok(old) => {
            // Its log is moved aside below whatever the close says.
            if let Err(e) = old.close().await {
                tracing::warn!(shard, error = %e, "closing the shard before its re-sync");
            }
        }
        Err(old) => {
            owned.insert(shard, old);
            return Err(EngineError::Meta(format!(
                "re-sync of shard {shard}: the shard is still in use"
            )));
        }
    }
    let result = match swap {
        Swap::Install { file, expect } => {
            replace_shard(owned, shard, &file, expect, &opening).await
        }
        Swap::Rewind { lsn } => rewind_shard(owned, shard, lsn, &opening).await,
    };
    if result.is_err() && !owned.contains_key(&shard) {
        // Whatever the directory holds now (the old log if nothing was moved
        // yet, else the snapshot being installed) is opened again, so the
        // shard is not left out of the engine.
        match reopen(&opening).await {
            Ok(reopened) => {
                owned.insert(shard, Rc::new(reopened));
            }
            Err(e) => {
                tracing::error!(shard, error = %e, "the shard could not be reopened after a failed re-sync")
            }
        }
    }
    result
}

/// Records `epoch` as the shard's epoch floor (see
/// [`super::shard::EPOCH_FLOOR_PREFIX`]): the new name is made durable
/// before the older ones are removed, so a crash leaves one or both, and the
/// highest counts.
fn raise_epoch_floor(dir: &Path, epoch: u64) -> std::io::Result<()> {
    use super::shard::{EPOCH_FLOOR_PREFIX, parse_epoch_floor};
    File::create(dir.join(format!("{EPOCH_FLOOR_PREFIX}{epoch:020}")))?.sync_all()?;
    super::rewind::sync_dir(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let older = name
            .to_str()
            .and_then(parse_epoch_floor)
            .is_some_and(|e| e < epoch);
        if older {
            std::fs::remove_file(dir.join(name))?;
        }
    }
    super::rewind::sync_dir(dir)
}

/// Completes a snapshot install a crash interrupted in `dir`, before the
/// shard is opened (see `install.rs`).
fn finish_install(dir: &Path) -> Result<(), EngineError> {
    let finished = super::install::finish_install(dir).map_err(EngineError::Meta)?;
    if let Some((quarantine, moved)) = finished {
        tracing::warn!(dir = %dir.display(), moved, quarantine = %quarantine.display(),
            "completed a snapshot re-sync that a crash interrupted; the old log is kept aside");
    }
    Ok(())
}

async fn reopen(opening: &Opening) -> Result<Shard<DmaStorage>, EngineError> {
    finish_install(&opening.dir)?;
    let storage = DmaStorage::open(&opening.dir, opening.policy)
        .await?
        .with_sync_mode(opening.sync_mode);
    Shard::open(storage, opening.wal.clone()).await
}

/// Moves the closed shard's files aside, installs the snapshot and opens
/// the shard on it (crash-safe: see `install.rs`).
async fn replace_shard(
    owned: &mut BTreeMap<u32, Rc<Shard<DmaStorage>>>,
    shard: u32,
    file: &Path,
    expect: Expect,
    opening: &Opening,
) -> Result<Expect, EngineError> {
    // Plain file calls, on glommio's blocking thread (see `install`).
    let (dir, file, log) = (opening.dir.clone(), file.to_path_buf(), opening.wal.log);
    let (quarantine, moved) = glommio::executor()
        .spawn_blocking(move || {
            super::install::install(super::install::Install {
                dir: &dir,
                file: &file,
                lsn: expect.lsn,
                log,
            })
        })
        .await
        .map_err(|e| EngineError::Meta(format!("re-sync of shard {shard}: {e}")))?;
    tracing::warn!(shard, moved, quarantine = %quarantine.display(), lsn = expect.lsn,
        "re-syncing from an upstream snapshot; the old log is kept aside");
    let opened = reopen(opening).await?;
    let at = opened.wal().next_position();
    let ok =
        opened.open_report().snapshot.is_some() && at.lsn == expect.lsn && at.chain == expect.chain;
    owned.insert(shard, Rc::new(opened));
    if !ok {
        return Err(EngineError::Meta(format!(
            "re-sync of shard {shard}: the snapshot did not verify or ends at lsn {} chain {}, not {} / {}",
            at.lsn, at.chain, expect.lsn, expect.chain
        )));
    }
    Ok(at)
}

/// Rewinds the closed shard's log (see [`Engine::rewind`]) and opens it.
async fn rewind_shard(
    owned: &mut BTreeMap<u32, Rc<Shard<DmaStorage>>>,
    shard: u32,
    lsn: u64,
    opening: &Opening,
) -> Result<Expect, EngineError> {
    let refused =
        |why: String| EngineError::Meta(format!("rewind of shard {shard} to lsn {lsn}: {why}"));
    // The rewind reads and copies whole segments with plain file calls: on
    // glommio's blocking thread, so the other shards of this executor go on.
    let (dir, log) = (opening.dir.clone(), opening.wal.log);
    let plan = glommio::executor()
        .spawn_blocking(move || super::rewind::plan_rewind(&dir, log, lsn))
        .await
        .map_err(refused)?;
    if let Some(name) = &plan.base_snapshot {
        // The state is rebuilt from it: it must load before the snapshots
        // past the cut are moved aside.
        let storage = DmaStorage::open(&opening.dir, opening.policy).await?;
        let verified = crate::state::verify_snapshot::<_, crate::state::KvState>(
            &storage,
            opening.wal.log,
            name,
        )
        .await
        .map_err(|e| refused(e.to_string()))?;
        verified.map_err(|why| {
            refused(format!(
                "{name}, the snapshot to rebuild from, does not load: {why}"
            ))
        })?;
    }
    let rewound = glommio::executor()
        .spawn_blocking(move || super::rewind::apply_rewind(plan))
        .await
        .map_err(refused)?;
    tracing::warn!(shard, lsn, old_end = rewound.old_end, quarantine = %rewound.quarantine.display(),
        files = ?rewound.files, "rewound the log; the records past the cut are kept aside");
    let opened = reopen(opening).await?;
    let at = opened.wal().next_position();
    owned.insert(shard, Rc::new(opened));
    if at.lsn != lsn {
        return Err(EngineError::Meta(format!(
            "rewind of shard {shard}: the log reopened ending at lsn {}, not {lsn}",
            at.lsn
        )));
    }
    Ok(at)
}

/// Waits for the requests in flight, then closes every shard.
async fn close_all(
    owned: BTreeMap<u32, Rc<Shard<DmaStorage>>>,
    in_flight: &std::cell::Cell<usize>,
) -> Result<(), EngineError> {
    // A request can wait long (a write for its replicas, up to the commit
    // timeout): look every millisecond rather than spin the core meanwhile.
    while in_flight.get() > 0 {
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
    let mut result = Ok(());
    for (id, shard) in owned {
        match Rc::try_unwrap(shard) {
            Ok(shard) => {
                if let Err(e) = shard.close().await {
                    result = Err(e);
                }
            }
            // Something still holds the shard: it cannot be closed, and what
            // it staged at the memory level may not reach the disk. Say so.
            Err(_) => {
                result = Err(EngineError::Meta(format!(
                    "shard {id} was still in use at close; its staged writes may be lost"
                )))
            }
        }
    }
    result
}

async fn serve(shards: &BTreeMap<u32, Rc<Shard<DmaStorage>>>, request: Request) {
    // A shard whose WAL failed holds staged writes of unknown fate: it
    // answers nothing more until the engine is reopened.
    let shard_of = |id: u32| {
        let shard = shards.get(&id).cloned().ok_or(EngineError::Closed)?;
        match shard.failure() {
            Some(e) => Err(e),
            None => Ok(shard),
        }
    };
    match request {
        Request::Write {
            shard,
            ops,
            level,
            reply,
        } => {
            let result = match shard_of(shard) {
                Ok(s) => {
                    let borrowed: Vec<Op<'_>> = ops
                        .iter()
                        .map(|op| match op {
                            BatchOp::Put(key, value) => Op::Put { key, value },
                            BatchOp::Delete(key) => Op::Delete { key },
                        })
                        .collect();
                    s.write(&borrowed, level).await
                }
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Request::Get { shard, key, reply } => {
            let _ = reply.send(shard_of(shard).map(|s| s.get(&key)));
        }
        Request::Scan {
            shard,
            start,
            end,
            prefix,
            limit,
            reply,
        } => {
            let result = shard_of(shard).map(|s| {
                if prefix {
                    s.scan_prefix(&start, limit)
                } else {
                    s.scan(&start, end.as_deref(), limit)
                }
            });
            let _ = reply.send(result);
        }
        Request::Snapshot { shard, hold, reply } => {
            let result = match shard_of(shard) {
                Ok(s) => s.snapshot_holding(hold).await.map(|pos| pos.lsn),
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Request::Update {
            shard,
            key,
            decide,
            level,
            reply,
        } => {
            let result = match shard_of(shard) {
                Ok(s) => s.update(&key, decide, level).await,
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Request::Replicate {
            shard,
            records,
            level,
            reply,
        } => {
            let result = match shard_of(shard) {
                Ok(s) => s.replicate(&records, level).await,
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Request::BeginEpoch {
            shard,
            epoch,
            reply,
        } => {
            let result = match shard_of(shard) {
                Ok(s) => s.begin_epoch(epoch).await,
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Request::ReadLog {
            shard,
            from,
            max_bytes,
            wait,
            reply,
        } => {
            let result = match shard_of(shard) {
                Ok(s) => {
                    if !wait.is_zero() && s.wal().durable_lsn() <= from.lsn {
                        let _ = glommio::timer::timeout(wait, async {
                            s.wal().durable_past(from.lsn).await;
                            Ok(())
                        })
                        .await;
                    }
                    s.wal()
                        .read(from, max_bytes)
                        .await
                        .map_err(EngineError::from)
                }
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Request::Close { .. }
        | Request::Run(_)
        | Request::Stats { .. }
        | Request::Freeze { .. }
        | Request::Swap { .. }
        | Request::RaiseEpochFloor { .. } => {
            unreachable!("handled by the executor loop")
        }
    }
}

fn shard_stats(id: u32, executor: u32, shard: &Shard<DmaStorage>) -> ShardStats {
    let wal = shard.wal();
    let next = wal.next_position();
    ShardStats {
        shard: id,
        executor,
        epoch: next.epoch,
        epoch_floor: shard.epoch_floor(),
        epoch_begun: shard.epoch_begun(),
        durable_lsn: wal.durable_lsn(),
        next_lsn: next.lsn,
        chain: next.chain,
        first_lsn: wal.first_position().lsn,
        epochs: wal.epochs(),
        segments: wal.segment_count(),
        keys: shard.len(),
        wal: wal.stats(),
        failure: shard.failure().map(|e| e.to_string()),
    }
}
