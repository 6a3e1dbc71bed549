//! The write-ahead log of one shard.
//!
//! - `segment`: segment files: naming, spare preparation, the open set.
//! - `scan` / `recovery`: verifying segments and deciding where the log ends.
//! - `writer` / `flusher`: group commit: staging, then the writer and syncer tasks.
//! - `reader`: durable records by LSN.
//!
//! A segment is `{base_lsn:020}.wal`: a 4 KiB header block, then records
//! packed back to back, then zeros (or, in a recycled segment, a zero block
//! and an older life's bytes). Every block of a segment is written before it
//! holds a record (zero-filled when new, or by its earlier life when
//! recycled), so a later `fdatasync` never has to convert unwritten extents.
//! Records never span segments; LSNs are contiguous across them.

mod flusher;
mod reader;
mod recovery;
mod scan;
mod segment;
mod writer;

use std::rc::Rc;

use crate::format::{
    FormatError, LogId, RECORD_BODY_MAX, RECORD_HEADER_BYTES, SEGMENT_HEADER_BLOCK,
};
use crate::io::{IoError, Storage};

pub use reader::{OwnedRecord, ReadBatch};
pub use recovery::{Case, Cut, Decision, Refusal, decide};
pub use scan::{ScanStop, SegmentScan, offset_of, scan_segment};
pub use writer::{Pending, Receipt, WalStats};

use segment::Segments;
use writer::Writer;

/// How a new segment's blocks are made real before it holds records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentFill {
    /// Write zeros over the whole file (the default; see FORMAT.md).
    Zeros,
    /// `fallocate` only: cheaper to create, but each `fdatasync` then
    /// commits the journal to convert unwritten extents.
    Allocate,
}

/// Options of one shard's log. Units are last in every name.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Which log this is; every segment header must match.
    pub log: LogId,
    /// Epoch stamped into new records; may not be below the log's last.
    /// 0: continue in the log's own last epoch (at least 1), which is
    /// what a node does: its epoch lives in its records, so a promotion
    /// (`Wal::begin_epoch`) or records of a later epoch taken from an
    /// upstream outlast a restart.
    pub epoch: u64,
    /// Size of a segment file, header block included.
    pub segment_bytes: u64,
    /// Most record bytes one write + sync carries.
    pub batch_bytes_max: usize,
    /// Most writes the flusher keeps on the device at once. Above 1, a
    /// batch written while others are in flight is padded to a block
    /// boundary (a `Noop` record; see FORMAT.md), so that the next one does
    /// not share its last block and can be written beside it. 1: one write
    /// at a time, no padding.
    pub writes_in_flight: usize,
    /// Most bytes staged and not yet written; appends wait beyond it.
    pub staged_bytes_max: usize,
    pub segment_fill: SegmentFill,
    /// The log's records come from an upstream that holds them too (a
    /// replica): a damaged record in the last segment is cut as a torn
    /// tail even when a later record's `durable_gap` says it was durable,
    /// because that durability was the upstream's, and the records after
    /// the cut are fetched again. Off, such damage is refused.
    pub tail_refetchable: bool,
    /// The highest epoch this log began itself (a replica promoted to
    /// primary; 0 if never). With `tail_refetchable`, damage in the last
    /// segment after a record of this epoch or an older one is still
    /// refused: those records may be this node's own, acknowledged by it,
    /// and no upstream holds them to send again.
    pub own_epoch_max: u64,
}

impl WalOptions {
    pub fn new(log: LogId) -> Self {
        Self {
            log,
            epoch: 1,
            segment_bytes: 64 << 20,
            batch_bytes_max: 1 << 20,
            writes_in_flight: 4,
            staged_bytes_max: 16 << 20,
            segment_fill: SegmentFill::Zeros,
            tail_refetchable: false,
            own_epoch_max: 0,
        }
    }

    /// Largest body one record may carry with these options.
    pub fn record_body_max(&self) -> usize {
        let capacity = self.segment_bytes as usize - SEGMENT_HEADER_BLOCK;
        RECORD_BODY_MAX.min(capacity - RECORD_HEADER_BYTES)
    }

    fn check(&self) -> Result<(), WalError> {
        let ok = self.segment_bytes.is_multiple_of(4096)
            && self.segment_bytes >= 2 * SEGMENT_HEADER_BLOCK as u64
            && self.batch_bytes_max > 0
            && self.writes_in_flight > 0
            && self.staged_bytes_max >= self.batch_bytes_max;
        if ok {
            Ok(())
        } else {
            Err(WalError::Options(format!("{self:?}")))
        }
    }
}

/// Errors of the WAL layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    #[error(transparent)]
    Io(#[from] IoError),
    /// The log cannot be opened as it is on disk.
    #[error("{}: {} at offset {}: {}", refusal.segment, case_name(refusal.case), refusal.offset, refusal.why)]
    Corrupt { refusal: Refusal },
    /// A read found a record that does not validate.
    #[error("{segment} offset {offset}: {error}")]
    BadRecord {
        segment: String,
        offset: u64,
        error: FormatError,
    },
    /// A write or sync failed earlier; the shard accepts no more writes and
    /// acknowledges nothing written after the last successful sync.
    #[error("the log failed and accepts no writes: {0}")]
    Failed(IoError),
    #[error("record body of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("epoch {epoch} is below the log's last epoch {last}")]
    EpochRegressed { epoch: u64, last: u64 },
    #[error("lsn {lsn} is not a record boundary held by this log ({why})")]
    Position { lsn: u64, why: &'static str },
    #[error("the log is closed")]
    Closed,
    /// Records offered by an upstream do not continue this log.
    #[error("records rejected at lsn {lsn}: {error}")]
    Rejected {
        lsn: u64,
        error: crate::format::FormatError,
    },
    #[error("invalid options: {0}")]
    Options(String),
}

fn case_name(case: Case) -> &'static str {
    match case {
        Case::CorruptRecord => "corrupt record",
        Case::CorruptHeader => "corrupt segment header",
        Case::Gap => "gap in the log",
        _ => "unexpected",
    }
}

/// What [`Wal::open`] found and did.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    pub case: Case,
    /// Where the next record goes.
    pub end_lsn: u64,
    pub segments: usize,
    pub records: u64,
    /// A torn tail that was cut, provisionally.
    pub cut: Option<Cut>,
    /// A segment file discarded because its header never became durable.
    pub discarded: Option<String>,
    /// Where each epoch of the log held starts: `(epoch, first lsn)`,
    /// oldest first (what released segments held is not known).
    pub epochs: Vec<(u64, u64)>,
}

/// One shard's log: append with group commit, read by LSN, release old segments.
pub struct Wal<S: Storage + 'static> {
    writer: Writer<S>,
    segments: Rc<Segments<S>>,
    report: RecoveryReport,
    record_body_max: usize,
}

impl<S: Storage + 'static> Wal<S> {
    /// Recovers the log in `storage` and starts its flusher task. Must run
    /// inside a glommio executor.
    pub async fn open(storage: S, options: WalOptions) -> Result<Self, WalError> {
        Self::open_at(storage, options, None).await
    }

    /// [`Wal::open`], but a log with no segments at all starts at `origin`
    /// (an LSN, the chain before it, an epoch) instead of at zero: a shard
    /// re-synced from a snapshot continues its upstream's log from the
    /// snapshot's position. A log that has segments ignores `origin`.
    pub async fn open_at(
        storage: S,
        options: WalOptions,
        origin: Option<crate::format::Expect>,
    ) -> Result<Self, WalError> {
        options.check()?;
        let mut options = options;
        let storage = Rc::new(storage);
        let (mut segments, report, mut end, tail) =
            Segments::recover(storage.clone(), &options).await?;
        if let Some(origin) = origin
            && segments.len() == 0
        {
            segments.set_origin(origin);
            end = origin;
        }
        if options.epoch == 0 {
            options.epoch = end.epoch.max(1);
        }
        if options.epoch < end.epoch {
            return Err(WalError::EpochRegressed {
                epoch: options.epoch,
                last: end.epoch,
            });
        }
        let segments = Rc::new(segments);
        let record_body_max = options.record_body_max();
        let writer = Writer::start(
            storage,
            segments.clone(),
            options,
            end,
            tail,
            &report.epochs,
        )?;
        Ok(Self {
            writer,
            segments,
            report,
            record_body_max,
        })
    }

    /// Largest record body this log takes.
    pub fn record_body_max(&self) -> usize {
        self.record_body_max
    }

    /// What recovery found.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.report
    }

    /// Appends one record and resolves once the sync that covers it is done.
    pub async fn append(
        &self,
        kind: crate::format::RecordKind,
        body: &[u8],
    ) -> Result<Receipt, WalError> {
        self.writer.wait_for_space().await?;
        self.writer.submit(kind, body)?.await
    }

    /// `(epoch, first lsn)` of each epoch of the log held, oldest first,
    /// the current one last: what a replica's Hello carries, so that a
    /// divergence after a failover is located.
    pub fn epochs(&self) -> Vec<(u64, u64)> {
        self.writer.epochs()
    }

    /// Records staged from now on carry `epoch`, which must be above every
    /// epoch in the log (a node promoted to primary fences off the records
    /// of the one it replaced). It lasts for the log's life; a record of
    /// the new epoch must be appended for it to survive a restart.
    pub fn begin_epoch(&self, epoch: u64) -> Result<(), WalError> {
        self.writer.begin_epoch(epoch)
    }

    /// Waits while the staging area is full (back-pressure); a caller that
    /// then calls [`Wal::submit`] without an await in between stages without
    /// overrunning it.
    pub async fn wait_for_space(&self) -> Result<(), WalError> {
        self.writer.wait_for_space().await
    }

    /// Stages one record now (its LSN is fixed on return) without waiting for
    /// staging space; the returned future resolves when it is durable. Drop
    /// it to not wait (the `memory` commit level).
    pub fn submit(
        &self,
        kind: crate::format::RecordKind,
        body: &[u8],
    ) -> Result<Pending, WalError> {
        self.writer.submit(kind, body)
    }

    /// Stages records encoded elsewhere (a replication upstream) byte for
    /// byte, after checking that each continues this log (LSN, chain,
    /// epoch); see `Writer::submit_raw`. The future resolves when the last
    /// one is durable. Callers wait for space first, as for `submit`.
    pub fn submit_raw(&self, records: &[u8]) -> Result<Option<Pending>, WalError> {
        self.writer.submit_raw(records)
    }

    /// LSN up to which every record is durable.
    pub fn durable_lsn(&self) -> u64 {
        self.writer.durable_lsn()
    }

    /// The position the next record will take: everything staged so far
    /// lies below it.
    pub fn next_position(&self) -> crate::format::Expect {
        self.writer.next_position()
    }

    /// LSN the next record will get.
    pub fn next_lsn(&self) -> u64 {
        self.writer.next_lsn()
    }

    /// Counters since open.
    pub fn stats(&self) -> WalStats {
        self.writer.stats()
    }

    /// The error that stopped the log, if one did.
    pub fn failure(&self) -> Option<WalError> {
        self.writer.failure()
    }

    /// The position of the oldest record held (LSN, chain seed, epoch floor).
    pub fn first_position(&self) -> crate::format::Expect {
        self.segments.first_position()
    }

    /// Reads durable records from `from` (a position returned by an earlier
    /// read or by [`Wal::first_position`]), up to about `max_bytes`.
    pub async fn read(
        &self,
        from: crate::format::Expect,
        max_bytes: usize,
    ) -> Result<ReadBatch, WalError> {
        // Recent batches are still in memory: a replica that keeps up is
        // served from there, without a disk read.
        if let Some(batch) = self.writer.read_recent(from, max_bytes) {
            // Not counted: nothing durable to read yet (a caught-up reader).
            if !batch.records.is_empty() {
                self.writer.count_read(true);
            }
            return Ok(batch);
        }
        self.writer.count_read(false);
        reader::read(&self.segments, from, self.durable_lsn(), max_bytes).await
    }

    /// Resolves once the durable LSN passes `lsn` (or the log fails or
    /// closes): what a replication sender waits on when it has sent
    /// everything.
    pub fn durable_past(&self, lsn: u64) -> impl std::future::Future<Output = ()> + 'static {
        self.writer.durable_past(lsn)
    }

    /// Deletes the segments whose records all lie below `lsn` (never the one
    /// being written). Returns how many were deleted.
    pub async fn release_below(&self, lsn: u64) -> Result<usize, WalError> {
        self.segments.release_below(lsn, self.durable_lsn()).await
    }

    /// Number of segment files held.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Flushes what is staged, stops the flusher and waits for it.
    pub async fn close(self) -> Result<(), WalError> {
        self.writer.close().await
    }
}
