//! Group commit: staging on the caller's task, one flusher task per shard.
//!
//! An append encodes its record straight into the open staging run (its LSN
//! and chain are fixed right there, in call order) and registers a waiter for
//! its end LSN. The flusher takes one run at a time, writes it (with the
//! partial block before it, rewritten byte-identical) and syncs; while that is
//! in flight, new appends fill the next run. So batches grow with load and no
//! timer is involved. When the sync returns, `durable_lsn` advances and the
//! waiters at or below it are resolved in order.
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

use glommio::task::JoinHandle;

use crate::format::{
    Expect, RECORD_HEADER_BYTES, RecordKind, SEGMENT_HEADER_BLOCK, SegmentHeader, encode_record,
    segment_file_name,
};
use crate::io::{BLOCK_BYTES, IoError, Storage, StorageFile};

use super::scan::offset_of;
use super::segment::{SegmentMeta, Segments, Tail, prepare_spare};
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
        match st.waiters.binary_search_by_key(&end_lsn, |(lsn, _)| *lsn) {
            Ok(i) => st.waiters[i].1 = Some(cx.waker().clone()),
            Err(_) => return Poll::Ready(Err(WalError::Closed)),
        }
        Poll::Pending
    }
}

/// A batch of encoded records bound for one segment.
struct Run {
    seg_base: u64,
    /// Position of the first record.
    start: Expect,
    bytes: Vec<u8>,
}

/// Counters of the flusher, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Write + sync rounds completed (one per batch).
    pub syncs: u64,
    /// Records made durable.
    pub records: u64,
    /// Record bytes made durable.
    pub record_bytes: u64,
    /// Bytes handed to the device, with rewritten partial blocks and headers.
    pub device_bytes: u64,
    /// Segments started.
    pub rotations: u64,
}

struct State {
    options: WalOptions,
    stats: WalStats,
    /// Where the next staged record goes.
    next: Expect,
    /// Segment the next record goes into, and the record bytes it holds.
    seg_base: Option<u64>,
    seg_used: u64,
    runs: VecDeque<Run>,
    staged_bytes: usize,
    durable_lsn: u64,
    /// One entry per staged record not yet durable: its end LSN and, once
    /// its `Pending` was polled, the waker to call.
    waiters: VecDeque<(u64, Option<Waker>)>,
    failed: Option<IoError>,
    closed: bool,
    flusher: Option<Waker>,
    space: Vec<Waker>,
    free: Vec<Vec<u8>>,
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
    fn fail(&mut self, error: IoError) {
        tracing::error!(%error, "WAL write failed; the shard stops accepting writes");
        self.failed = Some(error);
        for waker in self.waiters.drain(..).filter_map(|(_, w)| w) {
            waker.wake();
        }
        self.runs.clear();
        self.staged_bytes = 0;
        self.space.drain(..).for_each(Waker::wake);
    }

    fn mark_durable(&mut self, end_lsn: u64) {
        debug_assert!(end_lsn >= self.durable_lsn);
        self.stats.syncs += 1;
        self.stats.record_bytes += end_lsn - self.durable_lsn;
        self.durable_lsn = end_lsn;
        while let Some((lsn, _)) = self.waiters.front() {
            if *lsn > end_lsn {
                break;
            }
            self.stats.records += 1;
            let (_, waker) = self.waiters.pop_front().expect("front exists");
            // No waker: the append was never awaited (memory level).
            if let Some(waker) = waker {
                waker.wake();
            }
        }
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
            space: Vec::new(),
            free: Vec::new(),
            stats: WalStats::default(),
            options: options.clone(),
        }));
        let mut flusher = Flusher {
            state: state.clone(),
            storage,
            segments,
            options,
            current: tail.map(|t| Current {
                base_lsn: t.base_lsn,
                file: t.file,
                end_offset: t.end_offset,
                block: t.block,
                recycled: false,
            }),
            spare: SpareState::None,
            spare_seq: 0,
        };
        flusher.start_spare();
        let task = glommio::spawn_local(flusher.run()).detach();
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
        let size = (RECORD_HEADER_BYTES + body.len()) as u64;
        let capacity = st.options.segment_bytes - SEGMENT_HEADER_BLOCK as u64;
        if st.seg_base.is_none() || st.seg_used + size > capacity {
            st.seg_base = Some(st.next.lsn);
            st.seg_used = 0;
        }
        let seg_base = st.seg_base.expect("set above");
        let batch_max = st.options.batch_bytes_max;
        let open_run = st
            .runs
            .back()
            .is_some_and(|r| r.seg_base == seg_base && r.bytes.len() + size as usize <= batch_max);
        if !open_run {
            let bytes = st.free.pop().unwrap_or_default();
            let start = st.next;
            st.runs.push_back(Run {
                seg_base,
                start,
                bytes,
            });
        }
        let (lsn, chain, epoch) = (st.next.lsn, st.next.chain, st.options.epoch);
        let run = st.runs.back_mut().expect("pushed above");
        let checksum = encode_record(&mut run.bytes, kind, epoch, lsn, chain, body);
        let end_lsn = lsn + size;
        st.next = Expect {
            lsn: end_lsn,
            chain: checksum,
            epoch,
        };
        st.seg_used += size;
        st.staged_bytes += size as usize;
        st.waiters.push_back((end_lsn, None));
        if let Some(waker) = st.flusher.take() {
            waker.wake();
        }
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

    /// Waits while more than `staged_bytes_max` bytes are staged.
    pub async fn wait_for_space(&self) -> Result<(), WalError> {
        std::future::poll_fn(|cx| {
            let mut st = self.state.borrow_mut();
            st.check_open()?;
            if st.staged_bytes < st.options.staged_bytes_max {
                return Poll::Ready(Ok(()));
            }
            st.space.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    pub fn durable_lsn(&self) -> u64 {
        self.state.borrow().durable_lsn
    }

    pub fn next_lsn(&self) -> u64 {
        self.state.borrow().next.lsn
    }

    pub fn stats(&self) -> WalStats {
        self.state.borrow().stats
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
    }
}

/// Zeros for padding writes to a block and for the guard block.
static ZERO_BLOCK: [u8; BLOCK_BYTES as usize] = [0; BLOCK_BYTES as usize];

/// The segment being written.
struct Current<F> {
    base_lsn: u64,
    file: Rc<F>,
    /// File offset where the next record goes.
    end_offset: u64,
    /// Bytes of the block holding `end_offset`, up to it: rewritten as the
    /// prefix of the next write.
    block: Vec<u8>,
    /// Whether the file is a recycled segment, with old records past the
    /// end: then each write also zeroes the block after its end, so a scan
    /// always finds unwritten space right after the last record.
    recycled: bool,
}

enum SpareState {
    None,
    Preparing(JoinHandle<Result<String, WalError>>),
}

struct Flusher<S: Storage + 'static> {
    state: Rc<RefCell<State>>,
    storage: Rc<S>,
    segments: Rc<Segments<S>>,
    options: WalOptions,
    current: Option<Current<S::File>>,
    spare: SpareState,
    spare_seq: u64,
}

impl<S: Storage + 'static> Flusher<S> {
    async fn run(mut self) {
        while let Some(run) = self.next_run().await {
            let end_lsn = run.start.lsn + run.bytes.len() as u64;
            match self.flush(&run).await {
                Ok(()) => {
                    let mut st = self.state.borrow_mut();
                    st.mark_durable(end_lsn);
                    let mut bytes = run.bytes;
                    bytes.clear();
                    if st.free.len() < 4 {
                        st.free.push(bytes);
                    }
                }
                Err(error) => {
                    self.state.borrow_mut().fail(error);
                    break;
                }
            }
        }
        if let SpareState::Preparing(task) = std::mem::replace(&mut self.spare, SpareState::None) {
            let _ = task.await;
        }
    }

    /// The next run to write, or `None` once closed and drained.
    async fn next_run(&self) -> Option<Run> {
        std::future::poll_fn(|cx| {
            let mut st = self.state.borrow_mut();
            if st.failed.is_some() {
                return Poll::Ready(None);
            }
            if let Some(run) = st.runs.pop_front() {
                st.staged_bytes -= run.bytes.len();
                st.space.drain(..).for_each(Waker::wake);
                return Poll::Ready(Some(run));
            }
            if st.closed {
                return Poll::Ready(None);
            }
            st.flusher = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Writes one run and syncs it; a new segment's directory entry too.
    async fn flush(&mut self, run: &Run) -> Result<(), IoError> {
        let mut header = None;
        if self.current.as_ref().map(|c| c.base_lsn) != Some(run.seg_base) {
            self.rotate(run).await?;
            header = Some(
                SegmentHeader::new(
                    self.options.log,
                    run.seg_base,
                    self.options.epoch,
                    run.start.chain,
                )
                .to_block(),
            );
        }
        let current = self.current.as_mut().expect("rotated above");
        let pos = offset_of(current.base_lsn, run.start.lsn);
        assert_eq!(pos, current.end_offset, "runs are written in LSN order");
        let (write_pos, prefix) = match &header {
            Some(block) => (0, block.as_slice()),
            None => (pos - pos % BLOCK_BYTES, current.block.as_slice()),
        };
        assert_eq!(
            write_pos + prefix.len() as u64,
            pos,
            "prefix reaches the write position"
        );
        let end = pos + run.bytes.len() as u64;
        let padded_end = end.next_multiple_of(BLOCK_BYTES);
        let pad = &ZERO_BLOCK[..(padded_end - end) as usize];
        let guard: &[u8] = if current.recycled && padded_end < self.options.segment_bytes {
            &ZERO_BLOCK
        } else {
            &[]
        };
        current
            .file
            .write_at(write_pos, &[prefix, &run.bytes, pad, guard])
            .await?;
        current.file.sync().await?;
        if header.is_some() {
            self.storage.sync_dir().await?;
        }
        let mut st = self.state.borrow_mut();
        st.stats.device_bytes += padded_end + guard.len() as u64 - write_pos;
        st.stats.rotations += u64::from(header.is_some());
        drop(st);
        let block_start = end - end % BLOCK_BYTES;
        if block_start >= pos {
            current.block.clear();
            current
                .block
                .extend_from_slice(&run.bytes[(block_start - pos) as usize..]);
        } else {
            current.block.extend_from_slice(&run.bytes);
        }
        current.end_offset = end;
        let end_lsn = run.start.lsn + run.bytes.len() as u64;
        self.segments.set_end(current.base_lsn, end_lsn);
        Ok(())
    }

    /// Makes the spare file the segment that starts at `run.seg_base`.
    async fn rotate(&mut self, run: &Run) -> Result<(), IoError> {
        let recycled = self.segments.take_recycled();
        let spare = match recycled.clone() {
            Some(name) => name,
            None => self.take_spare().await?,
        };
        let name = segment_file_name(run.seg_base);
        self.storage.rename(&spare, &name).await?;
        let file = Rc::new(self.storage.open(&name).await?);
        self.segments.insert(SegmentMeta {
            base_lsn: run.seg_base,
            base_chain: run.start.chain,
            end_lsn: run.seg_base,
            file: file.clone(),
        });
        self.current = Some(Current {
            base_lsn: run.seg_base,
            file,
            end_offset: SEGMENT_HEADER_BLOCK as u64,
            block: Vec::new(),
            recycled: recycled.is_some(),
        });
        self.start_spare();
        Ok(())
    }

    /// The zero-filled spare: the one prepared in the background, or a new one.
    async fn take_spare(&mut self) -> Result<String, IoError> {
        match std::mem::replace(&mut self.spare, SpareState::None) {
            SpareState::Preparing(task) => task
                .await
                .unwrap_or(Err(WalError::Closed))
                .map_err(wal_to_io),
            SpareState::None => {
                self.spare_seq += 1;
                prepare_spare(
                    &*self.storage,
                    self.spare_seq,
                    self.options.segment_bytes,
                    self.options.segment_fill,
                )
                .await
                .map_err(wal_to_io)
            }
        }
    }

    /// Starts making the next spare in the background, if none is there.
    fn start_spare(&mut self) {
        // With released segments to recycle, no zeros need writing.
        if !matches!(self.spare, SpareState::None) || self.segments.has_recycled() {
            return;
        }
        self.spare_seq += 1;
        let (storage, seq) = (self.storage.clone(), self.spare_seq);
        let (bytes, fill) = (self.options.segment_bytes, self.options.segment_fill);
        let task =
            glommio::spawn_local(async move { prepare_spare(&*storage, seq, bytes, fill).await });
        self.spare = SpareState::Preparing(task.detach());
    }
}

fn wal_to_io(error: WalError) -> IoError {
    match error {
        WalError::Io(e) | WalError::Failed(e) => e,
        other => IoError::new(
            "prepare segment",
            "",
            std::io::Error::other(other.to_string()),
        ),
    }
}
