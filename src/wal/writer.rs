//! Group commit, the appending side: staging on the caller's task.
//!
//! An append encodes its record straight into the open staging run (its LSN
//! and chain are fixed right there, in call order) and registers a waiter for
//! its end LSN. The flusher (`flusher.rs`) writes runs in LSN order, up to
//! `writes_in_flight` at once, and syncs beside them; while they are on the
//! device, new appends fill the next run. So
//! batches grow with load and no timer is involved. When a sync returns,
//! `durable_lsn` advances and the waiters at or below it are resolved in order.
//!
//! A failed write or sync is fatal: the log records the error, every waiter
//! and every later append gets it, and nothing is acknowledged after it. The
//! sync is never retried (after a failed fsync the page state is unknown).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use glommio::task::JoinHandle;
use hdrhistogram::Histogram;

use crate::format::{
    Decoded, Expect, RECORD_HEADER_BYTES, RecordKind, SEGMENT_HEADER_BLOCK, decode_record,
    encode_record,
};
use crate::io::{AlignedBuf, BLOCK_BYTES, IoError, SharedBuf, Storage};

use super::reader::{OwnedRecord, ReadBatch};
use zerocopy::FromBytes;

use super::segment::{Segments, Tail};
use super::{WalError, WalOptions};

/// What a durable append returns: where the record sits and who wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub shard: u32,
    pub epoch: u64,
    /// LSN of the record.
    pub lsn: u64,
    /// LSN just past the record.
    pub end_lsn: u64,
}

/// A staged append. Its receipt is known at once; awaiting it waits for the
/// sync that covers the record. Dropping it stops waiting, nothing else.
pub struct Pending {
    receipt: Receipt,
    state: Rc<RefCell<State>>,
}

impl Pending {
    pub fn receipt(&self) -> Receipt {
        self.receipt
    }
}

impl Future for Pending {
    type Output = Result<Receipt, WalError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let end_lsn = self.receipt.end_lsn;
        let mut st = self.state.borrow_mut();
        if st.durable_lsn >= end_lsn {
            return Poll::Ready(Ok(self.receipt));
        }
        if let Some(error) = &st.failed {
            return Poll::Ready(Err(WalError::Failed(error.clone())));
        }
        // Waiters are in LSN order, one per record: find ours by its end.
        // Usually it is the last (polled right after it was staged).
        let waiters = &mut st.waiters;
        let i = match waiters.back() {
            Some((lsn, _)) if *lsn == end_lsn => waiters.len() - 1,
            _ => match waiters.binary_search_by_key(&end_lsn, |(lsn, _)| *lsn) {
                Ok(i) => i,
                Err(_) => return Poll::Ready(Err(WalError::Closed)),
            },
        };
        match &mut waiters[i].1 {
            // Polled again by the same task: keep the waker it has.
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// A batch of encoded records bound for one segment.
pub(super) struct Run {
    pub seg_base: u64,
    /// Position of the first record.
    pub start: Expect,
    /// The run laid out as it is written: `lead` bytes for what comes
    /// before its first record in the write (the segment header block, or
    /// the earlier records of the block it starts in; filled in when the
    /// run is issued), then its records. Block-aligned memory, so the write
    /// takes it without a copy.
    pub buf: AlignedBuf,
    pub lead: usize,
    /// Every record was staged here (`submit`), none taken from an upstream
    /// (`submit_raw`): only then may the log add padding after it, since a
    /// replica's log must hold exactly its upstream's records.
    pub local: bool,
}

/// Counters of the flusher, for benchmarks and metrics.
#[derive(Debug, Clone)]
pub struct WalStats {
    /// Write + sync rounds completed (one per batch).
    pub syncs: u64,
    /// Records made durable.
    pub records: u64,
    /// Record bytes made durable.
    pub record_bytes: u64,
    /// Of `record_bytes`, the `Noop` records that pad a batch to a block
    /// boundary so that the next write can go beside it.
    pub pad_bytes: u64,
    /// Bytes handed to the device, with rewritten partial blocks and headers.
    pub device_bytes: u64,
    /// Writes issued (a batch takes one, or two when split).
    pub writes: u64,
    /// Of `writes`, those issued while another write of the log was on the
    /// device.
    pub writes_beside: u64,
    /// Segments started.
    pub rotations: u64,
    /// Reads by LSN (a replication sender's) that returned records from
    /// the recent batches kept in memory.
    pub reads_from_memory: u64,
    /// Reads by LSN that went to the segments on disk: the reader was
    /// further behind than the recent batches reach.
    pub reads_from_disk: u64,
    /// Duration of each sync (the `fdatasync`, or with O_DSYNC writes the
    /// confirmation, and the directory sync with it), in
    /// microseconds.
    pub sync_micros: Histogram<u64>,
    /// Records made durable by each sync: the group-commit batch size.
    pub batch_records: Histogram<u64>,
    /// Duration of each write, from its issue to its completion as the
    /// log's executor sees it, in microseconds. With O_DSYNC writes (the
    /// default) this is what makes a batch durable, and `sync_micros` is
    /// only the confirmation after it.
    pub write_micros: Histogram<u64>,
}

impl Default for WalStats {
    fn default() -> Self {
        let histogram = || Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds");
        Self {
            syncs: 0,
            records: 0,
            record_bytes: 0,
            pad_bytes: 0,
            device_bytes: 0,
            writes: 0,
            writes_beside: 0,
            rotations: 0,
            reads_from_memory: 0,
            reads_from_disk: 0,
            sync_micros: histogram(),
            batch_records: histogram(),
            write_micros: histogram(),
        }
    }
}

/// What appenders and the flusher share. One thread, no locks: a RefCell
/// never borrowed across an await.
pub(super) struct State {
    options: WalOptions,
    pub stats: WalStats,
    /// Where the next staged record goes.
    next: Expect,
    /// Segment the next record goes into, and the record bytes it holds.
    seg_base: Option<u64>,
    seg_used: u64,
    pub runs: VecDeque<Run>,
    pub staged_bytes: usize,
    durable_lsn: u64,
    /// One entry per staged record not yet durable: its end LSN and, once
    /// its `Pending` was polled, the waker to call.
    waiters: VecDeque<(u64, Option<Waker>)>,
    pub failed: Option<IoError>,
    pub closed: bool,
    pub flusher: Option<Waker>,
    /// Appenders waiting for staging space, in arrival order (a ticket and
    /// its waker). Served strictly first come first served, so appends
    /// issued in some order are staged in that order even under
    /// back-pressure.
    pub space: VecDeque<(u64, Waker)>,
    next_ticket: u64,
    pub free: Vec<AlignedBuf>,
    /// The batches written most recently, newest last, as shared bytes
    /// (a small batch copied once, a large one shared with its write):
    /// what replication sends while it keeps up, without reading the disk
    /// and without a copy per replica.
    recent: VecDeque<Recent>,
    recent_bytes: usize,
    /// Tasks waiting for the durable LSN to move (replication senders).
    watchers: Vec<Waker>,
    /// `(epoch, first lsn)` of each epoch of the log, oldest first.
    epochs: Vec<(u64, u64)>,
}

/// A batch kept for replication.
struct Recent {
    start: Expect,
    bytes: Bytes,
    /// Bytes of memory it is charged for.
    charge: usize,
    /// The staging buffer it shares, taken back once nothing reads it.
    owner: Option<SharedBuf>,
}

/// A run is padded only with at most 1/PAD_RATIO_MAX of its own length.
/// Measured with 256 appenders of 100-byte records (batches of about
/// 17 KiB, alternating runs): 0.76-0.81 of the bar at 4, 0.56-0.62 at 8,
/// where batches went unpadded half the time and the two groups of
/// appenders merged; 4 KiB records one per batch are never padded.
const PAD_RATIO_MAX: u64 = 4;

/// Zeros: a padding record's body (less than two blocks), and the block the
/// flusher zeroes after a recycled segment's end when the log closes.
pub(super) static ZEROS: [u8; 2 * BLOCK_BYTES as usize] = [0; 2 * BLOCK_BYTES as usize];

/// Wakers waiting for the durable LSN kept at most (see `durable_past`).
const WATCHERS_MAX: usize = 1024;

/// Bytes of recent batches kept in memory for replication.
const RECENT_BYTES_MAX: usize = 8 << 20;

/// Batches at least this large are kept in the recent cache by sharing
/// their staging buffer (copying one would cost about what its write did);
/// smaller ones are copied, so the buffer returns to staging.
const RECENT_MOVE_BYTES: usize = 256 << 10;

/// Emptied staging buffers kept for reuse.
const FREE_BUFFERS_MAX: usize = 4;

impl Run {
    /// Bytes of its records.
    pub fn len(&self) -> usize {
        self.buf.len() - self.lead
    }
}

impl State {
    fn check_open(&self) -> Result<(), WalError> {
        match (&self.failed, self.closed) {
            (Some(e), _) => Err(WalError::Failed(e.clone())),
            (None, true) => Err(WalError::Closed),
            (None, false) => Ok(()),
        }
    }

    /// Records the fatal error and tells everyone waiting.
    pub fn fail(&mut self, error: IoError) {
        if self.failed.is_some() {
            return;
        }
        tracing::error!(%error, "WAL write failed; the shard stops accepting writes");
        self.failed = Some(error);
        for waker in self.waiters.drain(..).filter_map(|(_, w)| w) {
            waker.wake();
        }
        self.wake_watchers();
        self.runs.clear();
        self.staged_bytes = 0;
        if let Some(waker) = self.flusher.take() {
            waker.wake();
        }
        self.wake_space_head();
    }

    /// LSN where the next staged record goes.
    pub(super) fn next_lsn(&self) -> u64 {
        self.next.lsn
    }

    /// The run a record of `size` bytes goes into: the open one, or a new
    /// one (in a new segment when this one is full). `local`: the record is
    /// staged by `submit`.
    fn run_for(&mut self, size: u64, local: bool) {
        let capacity = self.options.segment_bytes - SEGMENT_HEADER_BLOCK as u64;
        if self.seg_base.is_none() || self.seg_used + size > capacity {
            self.seg_base = Some(self.next.lsn);
            self.seg_used = 0;
        }
        let seg_base = self.seg_base.expect("set above");
        let batch_max = self.options.batch_bytes_max;
        let open_run = self
            .runs
            .back()
            .is_some_and(|r| r.seg_base == seg_base && r.len() + size as usize <= batch_max);
        if !open_run {
            // A full run is closed on a block boundary, so that the write of
            // the one after it need not wait for its write.
            if local && self.pad_last_run() && self.seg_used + size > capacity {
                self.seg_base = Some(self.next.lsn);
                self.seg_used = 0;
            }
            let seg_base = self.seg_base.expect("set above");
            let start = self.next;
            // The write starts at the block holding the first record, or at
            // the segment header for a segment's first run.
            let offset = super::scan::offset_of(seg_base, start.lsn);
            let lead = if start.lsn == seg_base {
                SEGMENT_HEADER_BLOCK
            } else {
                (offset % BLOCK_BYTES) as usize
            };
            let mut buf = self.free.pop().unwrap_or_else(|| {
                // Room for the zeros and guard block the write adds.
                let records = batch_max.min(size as usize * 16);
                AlignedBuf::with_capacity(lead + records + 2 * BLOCK_BYTES as usize)
            });
            buf.clear();
            buf.extend_zeros(lead);
            self.runs.push_back(Run {
                seg_base,
                start,
                buf,
                lead,
                local,
            });
        }
        self.seg_used += size;
        self.staged_bytes += size as usize;
        let run = self.runs.back_mut().expect("pushed above");
        run.local &= local;
    }

    /// Ends the last staged run (popped by the writer, or still queued) on
    /// a block boundary with a `Noop` record, so that the next run starts
    /// one and its write can go beside this one's. Does nothing when the
    /// log writes one batch at a time, the run holds records of an upstream,
    /// it ends on a boundary already, or the padding would not fit in the
    /// segment or cost more than a quarter of the run. Returns whether it
    /// padded.
    pub fn pad_run(&mut self, run: &mut Run) -> bool {
        if self.options.writes_in_flight < 2
            || !run.local
            || self.seg_base != Some(run.seg_base)
            || run.start.lsn + run.len() as u64 != self.next.lsn
        {
            return false;
        }
        let offset = super::scan::offset_of(run.seg_base, self.next.lsn);
        let capacity = self.options.segment_bytes - SEGMENT_HEADER_BLOCK as u64;
        let mut gap = offset.next_multiple_of(BLOCK_BYTES) - offset;
        if gap == 0 {
            return false;
        }
        if gap < RECORD_HEADER_BYTES as u64 {
            gap += BLOCK_BYTES;
        }
        // Padding costs log space and replication bytes: at most a quarter
        // of the run (a run of one 4 KiB record would double).
        if self.seg_used + gap > capacity || gap * PAD_RATIO_MAX > run.len() as u64 {
            return false;
        }
        let body = &ZEROS[..gap as usize - RECORD_HEADER_BYTES];
        let Expect { lsn, chain, epoch } = self.next;
        let checksum = encode_record(
            &mut run.buf,
            RecordKind::Noop,
            epoch,
            lsn,
            chain,
            self.durable_lsn,
            body,
        );
        self.next = Expect {
            lsn: lsn + gap,
            chain: checksum,
            epoch,
        };
        self.seg_used += gap;
        self.staged_bytes += gap as usize;
        self.stats.pad_bytes += gap;
        true
    }

    /// [`State::pad_run`] on the last run still queued.
    fn pad_last_run(&mut self) -> bool {
        let Some(mut run) = self.runs.pop_back() else {
            return false;
        };
        let padded = self.pad_run(&mut run);
        self.runs.push_back(run);
        padded
    }

    /// Records that the bytes up to `next` are staged, and tells the flusher.
    fn staged(&mut self, next: Expect) {
        if next.epoch > self.next.epoch || self.epochs.is_empty() {
            // The record just staged starts an epoch.
            self.epochs.push((next.epoch, self.next.lsn));
        }
        self.next = next;
        self.waiters.push_back((next.lsn, None));
        if let Some(waker) = self.flusher.take() {
            waker.wake();
        }
    }

    /// Wakes the first appender waiting for space; it wakes the next.
    pub fn wake_space_head(&mut self) {
        if let Some((_, waker)) = self.space.front() {
            waker.wake_by_ref();
        }
    }

    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn
    }

    pub fn mark_durable(&mut self, end_lsn: u64) {
        debug_assert!(end_lsn >= self.durable_lsn);
        self.stats.syncs += 1;
        self.stats.record_bytes += end_lsn - self.durable_lsn;
        self.durable_lsn = end_lsn;
        let mut batch = 0;
        while let Some((lsn, _)) = self.waiters.front() {
            if *lsn > end_lsn {
                break;
            }
            batch += 1;
            self.stats.records += 1;
            let (_, waker) = self.waiters.pop_front().expect("front exists");
            // No waker: the append was never awaited (memory level).
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        self.stats.batch_records.saturating_record(batch);
        self.wake_watchers();
    }

    fn wake_watchers(&mut self) {
        for waker in self.watchers.drain(..) {
            waker.wake();
        }
    }

    /// Keeps a batch being written (records starting at `start`, a slice
    /// of the shared staging buffer `owner`) for readers, who see only its
    /// durable records. A large batch is kept as it is, and charged the
    /// buffer's capacity; a small one is copied (charged its length), and
    /// `owner` is handed back so the buffer returns to staging once its
    /// write completes.
    pub fn keep_recent(
        &mut self,
        start: Expect,
        records: Bytes,
        owner: SharedBuf,
    ) -> Option<SharedBuf> {
        if records.len() >= RECENT_MOVE_BYTES {
            let charge = owner.capacity();
            self.push_recent(Recent {
                start,
                bytes: records,
                charge,
                owner: Some(owner),
            });
            None
        } else {
            let bytes = Bytes::copy_from_slice(&records);
            self.push_recent(Recent {
                start,
                charge: bytes.len(),
                bytes,
                owner: None,
            });
            Some(owner)
        }
    }

    fn push_recent(&mut self, batch: Recent) {
        self.recent_bytes += batch.charge;
        self.recent.push_back(batch);
        while self.recent_bytes > RECENT_BYTES_MAX {
            let Some(old) = self.recent.pop_front() else {
                break;
            };
            self.recent_bytes -= old.charge;
            drop(old.bytes);
            // A buffer no sender or write still holds is staging's again.
            if let Some(buf) = old.owner.and_then(SharedBuf::reclaim) {
                self.recycle(buf);
            }
        }
    }

    /// The end of the last staged record that ends at or before `lsn`, or
    /// `floor` (a record boundary below every such record) if none does.
    pub fn record_end_at_or_before(&self, lsn: u64, floor: u64) -> u64 {
        let i = self.waiters.partition_point(|(end, _)| *end <= lsn);
        match i.checked_sub(1) {
            Some(i) => self.waiters[i].0.max(floor),
            None => floor,
        }
    }

    /// Keeps an emptied staging buffer for a later run, unless it grew far
    /// past a batch (one oversized record): reused, it would be charged its
    /// whole capacity in the recent cache again and again.
    pub fn recycle(&mut self, buf: AlignedBuf) {
        let batches = 2 * self.options.batch_bytes_max + 4 * BLOCK_BYTES as usize;
        let fits = buf.capacity() <= AlignedBuf::capacity_for(batches);
        if fits && self.free.len() < FREE_BUFFERS_MAX {
            self.free.push(buf);
        }
    }

    /// Durable records from `from`, about `max_bytes`, out of the recent
    /// batches: `None` when `from` is not among them (read the disk).
    fn read_recent(&self, from: Expect, max_bytes: usize) -> Option<ReadBatch> {
        let Recent { start, bytes, .. } =
            self.recent.iter().rev().find(|r| {
                r.start.lsn <= from.lsn && from.lsn < r.start.lsn + r.bytes.len() as u64
            })?;
        let first = (from.lsn - start.lsn) as usize;
        let mut at = first;
        let mut next = from;
        let mut records = Vec::new();
        let mut taken = 0;
        while at < bytes.len()
            && next.lsn < self.durable_lsn
            && (taken < max_bytes || records.is_empty())
        {
            // Bytes this process encoded and wrote: a record that does not
            // decode means the caller's position is not on this history.
            let Ok(Decoded::Record(r)) = decode_record(&bytes[at..], next) else {
                return None;
            };
            let n = r.encoded_len();
            records.push(OwnedRecord::at(&r, bytes, at));
            next = r.next();
            at += n;
            taken += n;
        }
        Some(ReadBatch {
            records,
            encoded: bytes.slice(first..at),
            next,
        })
    }

    /// Records how long one sync took.
    pub fn record_sync(&mut self, took: std::time::Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.stats.sync_micros.saturating_record(micros.max(1));
    }
}

/// The appending side of a log; owns the flusher task.
pub(super) struct Writer<S: Storage + 'static> {
    state: Rc<RefCell<State>>,
    task: RefCell<Option<JoinHandle<()>>>,
    _storage: std::marker::PhantomData<S>,
}

impl<S: Storage + 'static> Writer<S> {
    pub fn start(
        storage: Rc<S>,
        segments: Rc<Segments<S>>,
        options: WalOptions,
        end: Expect,
        tail: Option<Tail<S::File>>,
        epochs: &[(u64, u64)],
    ) -> Result<Self, WalError> {
        let capacity = options.segment_bytes - SEGMENT_HEADER_BLOCK as u64;
        let (seg_base, seg_used) = match &tail {
            Some(t) => (Some(t.base_lsn), t.end_offset - SEGMENT_HEADER_BLOCK as u64),
            None => (None, capacity),
        };
        let state = Rc::new(RefCell::new(State {
            next: Expect {
                epoch: end.epoch.max(options.epoch),
                ..end
            },
            seg_base,
            seg_used,
            runs: VecDeque::new(),
            staged_bytes: 0,
            durable_lsn: end.lsn,
            waiters: VecDeque::new(),
            failed: None,
            closed: false,
            flusher: None,
            space: VecDeque::new(),
            next_ticket: 0,
            free: Vec::new(),
            recent: VecDeque::new(),
            recent_bytes: 0,
            watchers: Vec::new(),
            epochs: epochs.to_vec(),
            stats: WalStats::default(),
            options: options.clone(),
        }));
        let task = super::flusher::start(state.clone(), storage, segments, options, tail);

        Ok(Self {
            state,
            task: RefCell::new(Some(task)),
            _storage: std::marker::PhantomData,
        })
    }

    /// Stages one record; see [`super::Wal::submit`].
    pub fn submit(&self, kind: RecordKind, body: &[u8]) -> Result<Pending, WalError> {
        let mut st = self.state.borrow_mut();
        st.check_open()?;
        let max = st.options.record_body_max();
        if body.len() > max {
            return Err(WalError::TooLarge {
                len: body.len(),
                max,
            });
        }
        if st.options.epoch < st.next.epoch {
            // Records of a later epoch came from an upstream: this log may
            // not write under an older one (fencing).
            return Err(WalError::EpochRegressed {
                epoch: st.options.epoch,
                last: st.next.epoch,
            });
        }
        let size = (RECORD_HEADER_BYTES + body.len()) as u64;
        // First: opening a run may pad the one before, which moves `next`.
        st.run_for(size, true);
        let (lsn, chain, epoch) = (st.next.lsn, st.next.chain, st.options.epoch);
        let durable_lsn = st.durable_lsn;
        let run = st.runs.back_mut().expect("run_for opened one");
        let checksum = encode_record(&mut run.buf, kind, epoch, lsn, chain, durable_lsn, body);
        let end_lsn = lsn + size;
        st.staged(Expect {
            lsn: end_lsn,
            chain: checksum,
            epoch,
        });
        let receipt = Receipt {
            shard: st.options.log.shard,
            epoch,
            lsn,
            end_lsn,
        };
        drop(st);
        Ok(Pending {
            receipt,
            state: self.state.clone(),
        })
    }

    /// Stages records encoded elsewhere (by a replication upstream) byte for
    /// byte: one encode for the primary's disk, the wire and this disk. Every
    /// record must decode at this log's next position (its LSN, the chain,
    /// an epoch not below the last) or nothing is staged and the error names
    /// the first record that does not. Returns the last record's pending
    /// append (`None` for no bytes).
    ///
    /// The records keep the upstream's `durable_gap`: it describes the
    /// upstream's durability, not this log's, so after a torn write here a
    /// recovery would read it as damage to acknowledged data and refuse to
    /// open. A replica's log is opened with `tail_refetchable`, which cuts
    /// such damage in the last segment instead; the upstream holds the same
    /// records and sends them again.
    pub fn submit_raw(&self, records: &[u8]) -> Result<Option<Pending>, WalError> {
        let mut st = self.state.borrow_mut();
        st.check_open()?;
        let max = st.options.record_body_max();
        // All or nothing: check every record before staging any.
        let mut expect = st.next;
        let mut sizes = Vec::new();
        let mut at = 0;
        while at < records.len() {
            let rejected = |error| WalError::Rejected {
                lsn: expect.lsn,
                error,
            };
            match decode_record(&records[at..], expect).map_err(rejected)? {
                Decoded::Record(r) => {
                    if r.body.len() > max {
                        return Err(WalError::TooLarge {
                            len: r.body.len(),
                            max,
                        });
                    }
                    let size = RECORD_HEADER_BYTES + r.body.len();
                    expect = Expect {
                        lsn: expect.lsn + size as u64,
                        chain: r.checksum(),
                        epoch: r.epoch(),
                    };
                    sizes.push(size);
                    at += size;
                }
                Decoded::Incomplete { .. } => {
                    return Err(WalError::Rejected {
                        lsn: expect.lsn,
                        error: crate::format::FormatError::Overrun { lsn: expect.lsn },
                    });
                }
            }
        }
        let mut last = None;
        let mut at = 0;
        for size in sizes {
            let bytes = &records[at..at + size];
            let header = crate::format::RecordHeader::ref_from_prefix(bytes)
                .map(|(h, _)| *h)
                .expect("decoded above");
            st.run_for(size as u64, false);
            let lsn = st.next.lsn;
            let run = st.runs.back_mut().expect("run_for opened one");
            run.buf.extend_from_slice(bytes);
            st.staged(Expect {
                lsn: lsn + size as u64,
                chain: header.checksum.get(),
                epoch: header.epoch.get(),
            });
            last = Some(Receipt {
                shard: st.options.log.shard,
                epoch: header.epoch.get(),
                lsn,
                end_lsn: lsn + size as u64,
            });
            at += size;
        }
        drop(st);
        Ok(last.map(|receipt| Pending {
            receipt,
            state: self.state.clone(),
        }))
    }

    /// Waits while more than `staged_bytes_max` bytes are staged, or while
    /// appenders that came first are still waiting: first come, first
    /// served, so the caller may stage right after this resolves (with no
    /// await in between) and keep its place in line.
    pub fn wait_for_space(&self) -> SpaceWait {
        SpaceWait {
            state: self.state.clone(),
            ticket: None,
        }
    }

    pub fn durable_lsn(&self) -> u64 {
        self.state.borrow().durable_lsn
    }

    /// `(epoch, first lsn)` of each epoch of the log, oldest first; the
    /// current epoch last (also when no record of it is staged yet).
    pub fn epochs(&self) -> Vec<(u64, u64)> {
        let st = self.state.borrow();
        let mut epochs = st.epochs.clone();
        let current = st.options.epoch.max(st.next.epoch);
        if epochs.last().is_none_or(|(e, _)| *e < current) {
            epochs.push((current, st.next.lsn));
        }
        epochs
    }

    /// Records staged from now on carry `epoch`; see [`super::Wal::begin_epoch`].
    pub fn begin_epoch(&self, epoch: u64) -> Result<(), WalError> {
        let mut st = self.state.borrow_mut();
        st.check_open()?;
        if epoch <= st.next.epoch {
            return Err(WalError::EpochRegressed {
                epoch,
                last: st.next.epoch,
            });
        }
        st.options.epoch = epoch;
        Ok(())
    }

    /// Durable records from `from` out of the batches kept in memory, or
    /// `None` when they are not there.
    pub fn read_recent(&self, from: Expect, max_bytes: usize) -> Option<ReadBatch> {
        let st = self.state.borrow();
        if from.lsn >= st.durable_lsn {
            return Some(ReadBatch {
                records: Vec::new(),
                encoded: Bytes::new(),
                next: from,
            });
        }
        st.read_recent(from, max_bytes)
    }

    /// Resolves once the durable LSN passes `lsn`, or the log fails or
    /// closes.
    pub fn durable_past(&self, lsn: u64) -> impl Future<Output = ()> + 'static {
        durable_past(self.state.clone(), lsn)
    }

    pub fn next_position(&self) -> Expect {
        self.state.borrow().next
    }

    pub fn next_lsn(&self) -> u64 {
        self.state.borrow().next.lsn
    }

    pub fn stats(&self) -> WalStats {
        self.state.borrow().stats.clone()
    }

    /// Counts a read by LSN: served from memory, or from the disk.
    pub fn count_read(&self, from_memory: bool) {
        let stats = &mut self.state.borrow_mut().stats;
        if from_memory {
            stats.reads_from_memory += 1;
        } else {
            stats.reads_from_disk += 1;
        }
    }

    pub fn failure(&self) -> Option<WalError> {
        self.state.borrow().failed.clone().map(WalError::Failed)
    }

    pub async fn close(&self) -> Result<(), WalError> {
        {
            let mut st = self.state.borrow_mut();
            st.closed = true;
            if let Some(waker) = st.flusher.take() {
                waker.wake();
            }
            st.wake_space_head();
            st.wake_watchers();
        }
        let task = self.task.borrow_mut().take();
        if let Some(task) = task {
            task.await;
        }
        match self.state.borrow().failed.clone() {
            Some(e) => Err(WalError::Failed(e)),
            None => Ok(()),
        }
    }
}

impl<S: Storage + 'static> Drop for Writer<S> {
    /// Lets the flusher drain what is staged and end, so a dropped log does
    /// not leave a task waiting forever.
    fn drop(&mut self) {
        let mut st = self.state.borrow_mut();
        st.closed = true;
        if let Some(waker) = st.flusher.take() {
            waker.wake();
        }
        st.wake_space_head();
        st.wake_watchers();
    }
}

/// Resolves once the durable LSN passes `lsn`, or the log fails or closes.
pub(super) fn durable_past(
    state: Rc<RefCell<State>>,
    lsn: u64,
) -> impl Future<Output = ()> + 'static {
    std::future::poll_fn(move |cx| {
        let mut st = state.borrow_mut();
        if st.durable_lsn > lsn || st.failed.is_some() || st.closed {
            return Poll::Ready(());
        }
        if st.watchers.len() >= WATCHERS_MAX {
            // Left by waits that timed out while nothing was written:
            // wake them (harmless) so the list stays small.
            st.wake_watchers();
        }
        st.watchers.push(cx.waker().clone());
        Poll::Pending
    })
}

/// The future of [`Writer::wait_for_space`]; leaves the line when dropped.
pub(super) struct SpaceWait {
    state: Rc<RefCell<State>>,
    ticket: Option<u64>,
}

impl Future for SpaceWait {
    type Output = Result<(), WalError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let state = self.state.clone();
        let mut st = state.borrow_mut();
        if let Err(e) = st.check_open() {
            self.leave(&mut st);
            return Poll::Ready(Err(e));
        }
        let head = st.space.front().map(|(t, _)| *t);
        let my_turn = match self.ticket {
            None => head.is_none(),
            Some(t) => head == Some(t),
        };
        if my_turn && st.staged_bytes < st.options.staged_bytes_max {
            if self.ticket.take().is_some() {
                st.space.pop_front();
                // The next in line checks for space once this one staged.
                st.wake_space_head();
            }
            return Poll::Ready(Ok(()));
        }
        match self.ticket {
            Some(t) => {
                if let Some(entry) = st.space.iter_mut().find(|(x, _)| *x == t) {
                    entry.1.clone_from(cx.waker());
                }
            }
            None => {
                let t = st.next_ticket;
                st.next_ticket += 1;
                st.space.push_back((t, cx.waker().clone()));
                self.ticket = Some(t);
            }
        }
        Poll::Pending
    }
}

impl SpaceWait {
    fn leave(&mut self, st: &mut State) {
        if let Some(t) = self.ticket.take() {
            let was_head = st.space.front().is_some_and(|(x, _)| *x == t);
            st.space.retain(|(x, _)| *x != t);
            if was_head {
                st.wake_space_head();
            }
        }
    }
}

impl Drop for SpaceWait {
    fn drop(&mut self) {
        if self.ticket.is_some() {
            let state = self.state.clone();
            // A drop during a borrow cannot happen: polls never hold one
            // across a return.
            if let Ok(mut st) = state.try_borrow_mut() {
                self.leave(&mut st);
            }
        }
    }
}
