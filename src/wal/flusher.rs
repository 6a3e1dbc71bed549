//! The I/O side of group commit: a writer task and a syncer task per shard.
//!
//! The writer takes staged runs in LSN order and issues each one's write
//! (the partial block before it, rewritten byte-identical, then the run,
//! then zeros). Up to `writes_in_flight` writes are on the device at once,
//! under one rule: a write never overlaps a write still in flight, since
//! two writes to the same block may land in either order. So a run that
//! starts inside the block where the previous one ended waits for it (it
//! stays staged, and keeps growing); the staging side ends a run on a block
//! boundary (a padding record) when it is written beside others, is large,
//! or fills the batch cap, so that the next one need not wait. A run written alone (the pipeline is empty, as after a
//! group commit acknowledged everyone) is issued as two writes, split at a
//! block boundary, so the appenders of its first half can stage their next
//! records while the second half is still on the device. That keeps the
//! device busy without a timer.
//!
//! Writes may complete in any order; the written LSN moves over the prefix
//! of completed writes only, and only to a record boundary. The syncer runs
//! beside the writer: whenever something written is not yet synced, it
//! calls `fdatasync` (and, after a rotation, syncs the directory), then
//! marks everything written before that call durable.
//!
//! Any error in either task is fatal for the log (see `State::fail`), and no
//! sync that completes after a failure acknowledges anything.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};

use glommio::task::JoinHandle;

use bytes::Bytes;

use crate::format::{SEGMENT_HEADER_BLOCK, SegmentHeader, segment_file_name};
use crate::io::{
    BLOCK_BYTES, IoError, SharedBuf, Storage, StorageFile, ZERO_FILL_GENTLE, ZeroPace,
};

use super::scan::offset_of;
use super::segment::{SegmentMeta, Segments, Tail, prepare_spare};
use super::writer::{Run, State, ZEROS, durable_past};
use super::{WalError, WalOptions};

/// What the writer, its writes in flight and the syncer share.
struct SyncState<F> {
    /// The segment file being written.
    file: Option<Rc<F>>,
    /// Writes issued and not yet counted as written, in file order.
    flights: VecDeque<Flight>,
    next_flight: u64,
    /// LSN up to which writes have completed (a record boundary).
    written_lsn: u64,
    /// LSN up to which a completed sync covers them.
    synced_lsn: u64,
    /// A rotation happened: the next sync also syncs the directory.
    dir_sync: bool,
    writer_done: bool,
    syncer: Option<Waker>,
    /// The writer, waiting for a write to complete or to be synced.
    writer: Option<Waker>,
}

/// One write on the device.
struct Flight {
    id: u64,
    /// The record boundary its completion (with every write before it)
    /// makes written.
    ack_lsn: u64,
    done: bool,
}

impl<F> SyncState<F> {
    fn wake_writer(&mut self) {
        if let Some(waker) = self.writer.take() {
            waker.wake();
        }
    }
}

/// Starts the writer and syncer tasks; the handle completes when both end.
pub(super) fn start<S: Storage + 'static>(
    state: Rc<RefCell<State>>,
    storage: Rc<S>,
    segments: Rc<Segments<S>>,
    options: WalOptions,
    tail: Option<Tail<S::File>>,
) -> JoinHandle<()> {
    let durable = state.borrow().durable_lsn();
    let sync = Rc::new(RefCell::new(SyncState {
        file: tail.as_ref().map(|t| t.file.clone()),
        flights: VecDeque::new(),
        next_flight: 0,
        written_lsn: durable,
        synced_lsn: durable,
        dir_sync: false,
        writer_done: false,
        syncer: None,
        writer: None,
    }));
    let mut writer = Writer {
        state: state.clone(),
        sync: sync.clone(),
        storage: storage.clone(),
        segments,
        options,
        current: tail.map(|t| Current {
            base_lsn: t.base_lsn,
            file: t.file,
            end_offset: t.end_offset,
            covered_end: t.end_offset.next_multiple_of(BLOCK_BYTES),
            block: t.block,
            recycled: false,
            unguarded: false,
        }),
        spare: SpareState::None,
    };
    writer.start_spare();
    let syncer = glommio::spawn_local(run_syncer(state, storage, sync));
    glommio::spawn_local(async move {
        writer.run().await;
        syncer.await;
    })
    .detach()
}

/// The segment being written.
struct Current<F> {
    base_lsn: u64,
    file: Rc<F>,
    /// File offset where the next record goes.
    end_offset: u64,
    /// File offset up to which issued writes reach (their zeros and guard
    /// block included): a write starting below it waits for them.
    covered_end: u64,
    /// Bytes of the block holding `end_offset`, up to it: rewritten as the
    /// prefix of the next write.
    block: Vec<u8>,
    /// Whether the file is a recycled segment, with old records past the
    /// end: then a write also zeroes the block after its end, so a scan
    /// finds unwritten space right after the last record, unless it ends
    /// on a block boundary to let the next write go beside it.
    recycled: bool,
    /// The last write left an older life's bytes right after the end (it
    /// ended on a boundary without a guard): zeroed when the log closes.
    unguarded: bool,
}

enum SpareState {
    None,
    Preparing(JoinHandle<Result<String, WalError>>),
}

struct Writer<S: Storage + 'static> {
    state: Rc<RefCell<State>>,
    sync: Rc<RefCell<SyncState<S::File>>>,
    storage: Rc<S>,
    segments: Rc<Segments<S>>,
    options: WalOptions,
    current: Option<Current<S::File>>,
    spare: SpareState,
}

impl<S: Storage + 'static> Writer<S> {
    async fn run(mut self) {
        while let Some(run) = self.next_run().await {
            if let Err(error) = self.issue(run).await {
                self.state.borrow_mut().fail(error);
                break;
            }
        }
        if let Err(error) = self.close_guard().await {
            self.state.borrow_mut().fail(error);
        }
        {
            let mut sync = self.sync.borrow_mut();
            sync.writer_done = true;
            if let Some(waker) = sync.syncer.take() {
                waker.wake();
            }
        }
        if let SpareState::Preparing(task) = std::mem::replace(&mut self.spare, SpareState::None) {
            let _ = task.await;
        }
    }

    /// The next run to write, once it can be issued, or `None` once closed
    /// and drained, or failed. A run stays staged (and keeps growing) while
    /// its write would have to wait for those in flight: it could only be
    /// issued after them anyway. A run that will be written beside others,
    /// or split, is padded to a block boundary first when it is the last one
    /// staged (see `State::pad_run`), so that the next run can go beside it.
    async fn next_run(&self) -> Option<Run> {
        std::future::poll_fn(|cx| {
            let mut st = self.state.borrow_mut();
            if st.failed.is_some() {
                return Poll::Ready(None);
            }
            let Some(front) = st.runs.front() else {
                if st.closed {
                    return Poll::Ready(None);
                }
                st.flusher = Some(cx.waker().clone());
                return Poll::Pending;
            };
            let mut sync = self.sync.borrow_mut();
            let busy = !sync.flights.is_empty();
            if busy && !self.may_go_beside(front, sync.flights.len()) {
                sync.writer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            drop(sync);
            let mut run = st.runs.pop_front().expect("front exists");
            if st.runs.is_empty() && (busy || run.len() >= SPLIT_MIN_BYTES) {
                st.pad_run(&mut run);
            }
            // The padding, too, was counted as staged.
            st.staged_bytes -= run.len();
            st.wake_space_head();
            Poll::Ready(Some(run))
        })
        .await
    }

    /// Whether `run`'s write may be issued while `in_flight` writes are on
    /// the device: a slot is free, it does not start a segment, and it
    /// starts past every block they cover.
    fn may_go_beside(&self, run: &Run, in_flight: usize) -> bool {
        let Some(current) = &self.current else {
            return false;
        };
        let pos = offset_of(current.base_lsn, run.start.lsn);
        in_flight < self.options.writes_in_flight
            && current.base_lsn == run.seg_base
            && pos - pos % BLOCK_BYTES >= current.covered_end
    }

    /// Waits until `ready` holds of the shared state, or the log failed.
    async fn until(&self, ready: impl Fn(&SyncState<S::File>) -> bool) -> Result<(), IoError> {
        std::future::poll_fn(|cx| {
            if let Some(error) = &self.state.borrow().failed {
                return Poll::Ready(Err(error.clone()));
            }
            let mut sync = self.sync.borrow_mut();
            if ready(&sync) {
                return Poll::Ready(Ok(()));
            }
            sync.writer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Waits until every write issued has completed and is synced (before a
    /// rotation, so that one sync never has to cover two files).
    async fn drained(&self) -> Result<(), IoError> {
        self.until(|s| s.flights.is_empty() && s.synced_lsn >= s.written_lsn)
            .await
    }

    /// Issues the writes of one run. Returns once they are on their way.
    async fn issue(&mut self, run: Run) -> Result<(), IoError> {
        let mut header = None;
        if self.current.as_ref().map(|c| c.base_lsn) != Some(run.seg_base) {
            self.drained().await?;
            self.rotate(&run).await?;
            let header_of = SegmentHeader::new(
                self.options.log,
                run.seg_base,
                self.options.epoch,
                run.start.chain,
            );
            header = Some(header_of.to_block());
        }
        let rotated = header.is_some();
        let in_flight = self.sync.borrow().flights.len();
        debug_assert!(
            in_flight == 0 || self.may_go_beside(&run, in_flight),
            "next_run takes a run only once its write can go"
        );
        let current = self.current.as_ref().expect("rotated above");
        let pos = offset_of(current.base_lsn, run.start.lsn);
        assert_eq!(pos, current.end_offset, "runs are written in LSN order");
        let Run {
            start,
            mut buf,
            lead,
            ..
        } = run;
        let records_len = buf.len() - lead;
        // What goes before the first record: the header block, or the
        // block's earlier records, rewritten byte-identical.
        let prefix = header.as_deref().unwrap_or(&current.block);
        let write_pos = pos - prefix.len() as u64;
        assert_eq!(prefix.len(), lead, "the run left room for its prefix");
        assert_eq!(write_pos % BLOCK_BYTES, 0, "writes start on a block");
        buf[..lead].copy_from_slice(prefix);
        let end = pos + records_len as u64;
        let padded_end = end.next_multiple_of(BLOCK_BYTES);
        // A run that ends on a boundary leaves the next block to the next
        // write, which may be issued before this one completes.
        let guard =
            current.recycled && end != padded_end && padded_end < self.options.segment_bytes;
        let guard_len = if guard { BLOCK_BYTES } else { 0 };
        buf.extend_zeros((padded_end - end + guard_len) as usize);
        let max = self.options.writes_in_flight;

        let end_lsn = start.lsn + records_len as u64;
        let total = padded_end + guard_len - write_pos;
        debug_assert_eq!(total, buf.len() as u64);
        // Alone on the device: SPLIT_PARTS writes (if as many may be in
        // flight), split at block boundaries before the end of the records.
        let alone = in_flight == 0;
        let parts = if alone && records_len >= SPLIT_MIN_BYTES {
            (records_len / (SPLIT_MIN_BYTES / 2)).clamp(1, max.min(SPLIT_PARTS))
        } else {
            1
        } as u64;
        let (base_lsn, file) = (current.base_lsn, current.file.clone());
        let lsn_at = |offset: u64| base_lsn + offset - SEGMENT_HEADER_BLOCK as u64;

        let mut st = self.state.borrow_mut();
        st.stats.device_bytes += total;
        st.stats.rotations += u64::from(rotated);
        let mut chunks = Vec::new();
        let mut from = write_pos;
        for i in 1..parts {
            let at = write_pos + (total * i / parts).next_multiple_of(BLOCK_BYTES);
            if at <= from || at >= end {
                continue;
            }
            let ack = st.record_end_at_or_before(lsn_at(at), start.lsn);
            chunks.push((from, at, ack));
            from = at;
        }
        chunks.push((from, write_pos + total, end_lsn));
        st.stats.writes += chunks.len() as u64;
        st.stats.writes_beside += chunks.len() as u64 - u64::from(alone);
        let (whole, owner) = buf.share();
        let records = whole.slice(lead..lead + records_len);
        let owner = st.keep_recent(start, records.clone(), owner);
        drop(st);

        let write = Rc::new(WriteBytes { whole, owner });
        for (from, to, ack_lsn) in chunks {
            let id = {
                let mut sync = self.sync.borrow_mut();
                let id = sync.next_flight;
                sync.next_flight += 1;
                sync.flights.push_back(Flight {
                    id,
                    ack_lsn,
                    done: false,
                });
                id
            };
            let task = WriteTask {
                state: self.state.clone(),
                sync: self.sync.clone(),
                segments: self.segments.clone(),
                file: file.clone(),
                base_lsn,
                write: write.clone(),
                id,
                range: (from - write_pos) as usize..(to - write_pos) as usize,
                pos: from,
            };
            glommio::spawn_local(task.run()).detach();
        }

        let current = self.current.as_mut().expect("rotated above");
        let block_start = end - end % BLOCK_BYTES;
        if block_start >= pos {
            current.block.clear();
            current
                .block
                .extend_from_slice(&records[(block_start - pos) as usize..]);
        } else {
            current.block.extend_from_slice(&records);
        }
        current.end_offset = end;
        current.covered_end = padded_end + guard_len;
        current.unguarded = current.recycled && !guard;
        Ok(())
    }

    /// Once the last write completed: zeroes the block after the end of a
    /// recycled segment whose last write left an older life's bytes there,
    /// so the log reopens `Intact`. (A crash before it leaves a torn tail to
    /// cut, as any crash may.)
    async fn close_guard(&mut self) -> Result<(), IoError> {
        self.until(|s| s.flights.is_empty()).await?;
        let Some(current) = self.current.as_mut() else {
            return Ok(());
        };
        let at = current.end_offset;
        if !current.unguarded || at + BLOCK_BYTES > self.options.segment_bytes {
            return Ok(());
        }
        debug_assert!(at.is_multiple_of(BLOCK_BYTES));
        current
            .file
            .write_at(at, &[&ZEROS[..BLOCK_BYTES as usize]])
            .await?;
        current.file.sync().await?;
        current.unguarded = false;
        Ok(())
    }

    /// Makes a spare file the segment that starts at `run.seg_base`: a
    /// recycled one if retention released one, else a zero-filled one.
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
        let mut sync = self.sync.borrow_mut();
        sync.file = Some(file.clone());
        sync.dir_sync = true;
        drop(sync);
        self.current = Some(Current {
            base_lsn: run.seg_base,
            file,
            end_offset: SEGMENT_HEADER_BLOCK as u64,
            covered_end: 0,
            block: Vec::new(),
            recycled: recycled.is_some(),
            unguarded: false,
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
                let (bytes, fill) = (self.options.segment_bytes, self.options.segment_fill);
                prepare_spare(&*self.storage, next_spare_seq(), bytes, fill, |_| {
                    ZeroPace::Urgent
                })
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
        let (storage, seq) = (self.storage.clone(), next_spare_seq());
        let (bytes, fill) = (self.options.segment_bytes, self.options.segment_fill);
        // The spare is needed when staging leaves the segment being written
        // (none yet: at once), or the log closes (close waits for it). Its
        // zeros go fast while their lead over that segment's use is short
        // (a fast log, or one that waits for them), and once it is long
        // they go no faster than the log.
        let (state, base) = (
            self.state.clone(),
            self.current.as_ref().map(|c| c.base_lsn),
        );
        let pace = move |zeroed: u64| {
            let st = state.borrow();
            let Some(base) = base.filter(|_| !st.closed && st.failed.is_none()) else {
                return ZeroPace::Urgent;
            };
            let used = st.next_lsn().saturating_sub(base);
            let lead = zeroed as i64 - used as i64;
            if lead < 0 {
                ZeroPace::Urgent
            } else if lead < SPARE_LEAD_BYTES / 4 {
                ZeroPace::Fast
            } else if lead < SPARE_LEAD_BYTES {
                ZeroPace::Gentle
            } else {
                // Go on once the log has used as much as one write zeroes.
                // This never holds up the rotation that needs the spare:
                // the writer rotates only after everything staged in this
                // segment is durable, which is more than 16 MiB past here.
                let at = st.next_lsn() + ZERO_FILL_GENTLE;
                ZeroPace::Wait(Box::pin(durable_past(state.clone(), at)))
            }
        };
        let task =
            glommio::spawn_local(
                async move { prepare_spare(&*storage, seq, bytes, fill, pace).await },
            );
        self.spare = SpareState::Preparing(task.detach());
    }
}

/// The lead a spare's zeros keep over the use of the segment being written:
/// below a quarter of it they go fast, beyond it they wait for the log (see
/// `zero_fill`).
const SPARE_LEAD_BYTES: i64 = 16 << 20;

/// A run alone on the device is split from this size on.
const SPLIT_MIN_BYTES: usize = 16 << 10;

/// Writes a run alone on the device is split into. Measured on the
/// development VM (alternating runs, medians of 3): splitting from 16 KiB
/// gave 256 appenders 0.78-0.79 of the bar against 0.66-0.76 unsplit, and
/// 64 KiB records 0.50-0.55 of the ceiling against 0.31-0.32; four parts
/// did no better than two, and three did worse (256 appenders 0.53-0.59
/// against 0.76-0.80, three alternating invocations).
const SPLIT_PARTS: usize = 2;

/// What a run's writes put on the device: the partial block before it, its
/// records, then zeros to the block boundary and the guard block, in one
/// block-aligned buffer shared with the recent cache.
struct WriteBytes {
    whole: Bytes,
    /// The buffer, to give back to staging after the last write, unless the
    /// recent cache keeps it.
    owner: Option<SharedBuf>,
}

/// One write of a run (the whole run, or one of its two halves).
struct WriteTask<S: Storage + 'static> {
    state: Rc<RefCell<State>>,
    sync: Rc<RefCell<SyncState<S::File>>>,
    segments: Rc<Segments<S>>,
    file: Rc<S::File>,
    base_lsn: u64,
    write: Rc<WriteBytes>,
    id: u64,
    range: std::ops::Range<usize>,
    pos: u64,
}

impl<S: Storage + 'static> WriteTask<S> {
    async fn run(self) {
        let bytes = self.write.whole.slice(self.range.clone());
        let issued = std::time::Instant::now();
        let result = self.file.write_shared(self.pos, bytes).await;
        let micros = issued.elapsed().as_micros() as u64;
        self.state
            .borrow_mut()
            .stats
            .write_micros
            .saturating_record(micros.max(1));
        // The last write of the run gives its buffer back.
        if let Some(WriteBytes { whole, owner }) = Rc::into_inner(self.write) {
            drop(whole);
            if let Some(buf) = owner.and_then(SharedBuf::reclaim) {
                self.state.borrow_mut().recycle(buf);
            }
        }
        if let Err(error) = result {
            self.state.borrow_mut().fail(error);
            self.sync.borrow_mut().wake_writer();
            return;
        }
        let mut sync = self.sync.borrow_mut();
        if let Some(flight) = sync.flights.iter_mut().find(|f| f.id == self.id) {
            flight.done = true;
        }
        let mut written = None;
        while sync.flights.front().is_some_and(|f| f.done) {
            let flight = sync.flights.pop_front().expect("front exists");
            written = Some(flight.ack_lsn);
        }
        if let Some(lsn) = written
            && lsn > sync.written_lsn
        {
            sync.written_lsn = lsn;
            self.segments.set_end(self.base_lsn, lsn);
            if let Some(waker) = sync.syncer.take() {
                waker.wake();
            }
        }
        sync.wake_writer();
    }
}

/// What one sync covers: the file, up to which LSN, and the directory too.
type SyncJob<F> = (Rc<F>, u64, bool);

/// Syncs whatever the writer has written, one `fdatasync` at a time, and
/// acknowledges it.
async fn run_syncer<S: Storage>(
    state: Rc<RefCell<State>>,
    storage: Rc<S>,
    sync: Rc<RefCell<SyncState<S::File>>>,
) {
    while let Some((file, upto, dir)) = next_sync_job(&state, &sync).await {
        let started = std::time::Instant::now();
        let synced = async {
            file.sync().await?;
            if dir {
                storage.sync_dir().await?;
            }
            Ok::<(), IoError>(())
        }
        .await;
        let mut st = state.borrow_mut();
        let mut s = sync.borrow_mut();
        s.wake_writer();
        match synced {
            // A sync that completes after a failure acknowledges nothing.
            Ok(()) if st.failed.is_none() => {
                st.record_sync(started.elapsed());
                s.synced_lsn = upto;
                st.mark_durable(upto);
            }
            Ok(()) => return,
            Err(error) => {
                st.fail(error);
                return;
            }
        }
    }
}

async fn next_sync_job<F>(
    state: &RefCell<State>,
    sync: &RefCell<SyncState<F>>,
) -> Option<SyncJob<F>> {
    std::future::poll_fn(|cx| {
        if state.borrow().failed.is_some() {
            return Poll::Ready(None);
        }
        let mut s = sync.borrow_mut();
        if s.written_lsn > s.synced_lsn {
            let file = s.file.clone().expect("a write had a file");
            let dir = std::mem::take(&mut s.dir_sync);
            return Poll::Ready(Some((file, s.written_lsn, dir)));
        }
        if s.writer_done {
            return Poll::Ready(None);
        }
        s.syncer = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// A spare file number unique in this process (and, being seeded from the
/// clock, across restarts): a log reopened while a dropped instance's spare
/// task still runs must not share a file name with it.
fn next_spare_seq() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if NEXT.load(Ordering::Relaxed) == 0 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let _ = NEXT.compare_exchange(0, nanos.max(1), Ordering::Relaxed, Ordering::Relaxed);
    }
    NEXT.fetch_add(1, Ordering::Relaxed)
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
