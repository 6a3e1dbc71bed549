//! The I/O side of group commit: a writer task and a syncer task per shard.
//!
//! The writer takes staged runs in LSN order and writes each one (the
//! partial block before it, rewritten byte-identical, then the run, then
//! zeros). Writes are strictly one after another: a run shares its first
//! block with the end of the previous one, and only a write issued after the
//! previous one completed is sure to land after it.
//!
//! The syncer runs beside it: whenever something written is not yet synced,
//! it calls `fdatasync` (and, after a rotation, syncs the directory), then
//! marks everything written before that call durable. So the next run's
//! write overlaps the previous run's sync, and appenders acked by one sync
//! stage their next records while the following write is on the device.
//!
//! Any error in either task is fatal for the log (see `State::fail`), and no
//! sync that completes after a failure acknowledges anything.

use std::cell::RefCell;
use std::rc::Rc;
use std::task::{Poll, Waker};

use glommio::task::JoinHandle;

use crate::format::{SEGMENT_HEADER_BLOCK, SegmentHeader, segment_file_name};
use crate::io::{BLOCK_BYTES, IoError, Storage, StorageFile};

use super::scan::offset_of;
use super::segment::{SegmentMeta, Segments, Tail, prepare_spare};
use super::writer::{Run, State};
use super::{WalError, WalOptions};

/// Zeros for padding writes to a block and for the guard block.
static ZERO_BLOCK: [u8; BLOCK_BYTES as usize] = [0; BLOCK_BYTES as usize];

/// What the writer and the syncer share.
struct SyncState<F> {
    /// The segment file being written.
    file: Option<Rc<F>>,
    /// LSN up to which writes have completed.
    written_lsn: u64,
    /// LSN up to which a completed sync covers them.
    synced_lsn: u64,
    /// A rotation happened: the next sync also syncs the directory.
    dir_sync: bool,
    writer_done: bool,
    syncer: Option<Waker>,
    /// The writer, waiting for everything written to be synced.
    drained: Option<Waker>,
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
        written_lsn: durable,
        synced_lsn: durable,
        dir_sync: false,
        writer_done: false,
        syncer: None,
        drained: None,
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
            block: t.block,
            recycled: false,
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
            if let Err(error) = self.write(&run).await {
                self.state.borrow_mut().fail(error);
                break;
            }
            self.state.borrow_mut().keep_recent(run.start, run.bytes);
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

    /// The next run to write, or `None` once closed and drained, or failed.
    async fn next_run(&self) -> Option<Run> {
        std::future::poll_fn(|cx| {
            let mut st = self.state.borrow_mut();
            if st.failed.is_some() {
                return Poll::Ready(None);
            }
            if let Some(run) = st.runs.pop_front() {
                st.staged_bytes -= run.bytes.len();
                st.wake_space_head();
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

    /// Waits until everything written is synced (before a rotation, so that
    /// one sync never has to cover two files).
    async fn drained(&self) -> Result<(), IoError> {
        std::future::poll_fn(|cx| {
            if let Some(error) = &self.state.borrow().failed {
                return Poll::Ready(Err(error.clone()));
            }
            let mut sync = self.sync.borrow_mut();
            if sync.synced_lsn >= sync.written_lsn {
                return Poll::Ready(Ok(()));
            }
            sync.drained = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Writes one run, then hands it to the syncer.
    async fn write(&mut self, run: &Run) -> Result<(), IoError> {
        let mut header = None;
        if self.current.as_ref().map(|c| c.base_lsn) != Some(run.seg_base) {
            self.drained().await?;
            self.rotate(run).await?;
            let header_of = SegmentHeader::new(
                self.options.log,
                run.seg_base,
                self.options.epoch,
                run.start.chain,
            );
            header = Some(header_of.to_block());
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

        let end_lsn = run.start.lsn + run.bytes.len() as u64;
        let mut st = self.state.borrow_mut();
        st.stats.device_bytes += padded_end + guard.len() as u64 - write_pos;
        st.stats.rotations += u64::from(header.is_some());
        drop(st);
        let mut sync = self.sync.borrow_mut();
        sync.written_lsn = end_lsn;
        if let Some(waker) = sync.syncer.take() {
            waker.wake();
        }
        drop(sync);

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
        self.segments.set_end(current.base_lsn, end_lsn);
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
                let (bytes, fill) = (self.options.segment_bytes, self.options.segment_fill);
                prepare_spare(&*self.storage, next_spare_seq(), bytes, fill)
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
        let task =
            glommio::spawn_local(async move { prepare_spare(&*storage, seq, bytes, fill).await });
        self.spare = SpareState::Preparing(task.detach());
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
        if let Some(waker) = s.drained.take() {
            waker.wake();
        }
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
