//! The storage seam: everything above this module does I/O through [`Storage`].
//!
//! io_uring submissions bypass the syscall layer where fault tools (strace,
//! LD_PRELOAD shims, seccomp) would inject errors, so this trait is the one
//! place where disk faults can be injected. It has two backends:
//!
//! - [`DmaStorage`]: glommio `DmaFile`s opened with `O_DIRECT`. Writes go
//!   straight to the device from aligned buffers, so `fdatasync` only has to
//!   flush the device cache and (for a file whose blocks are already written)
//!   no metadata. glommio silently falls back to buffered I/O where `O_DIRECT`
//!   cannot be had (tmpfs): [`DmaStorage::open`] checks the flag that is really
//!   in effect and refuses a durable log there unless told otherwise.
//! - [`FaultStorage`]: an in-memory filesystem that remembers what was synced
//!   and can, on command, lose what was not (a power cut), tear the last write
//!   at a sector boundary, flip bits, and fail a chosen operation with EIO or
//!   ENOSPC.
//!
//! Both are single-threaded (one executor per core owns its files), so the
//! trait uses `async fn` without `Send` bounds.

mod aligned;
mod dma;
mod fault;

use std::sync::Arc;

use bytes::Bytes;

pub use aligned::{AlignedBuf, SharedBuf};
pub use dma::{DirectIo, DmaFileHandle, DmaStorage, SyncMode};
pub use fault::{FaultFile, FaultOp, FaultStorage, PowerCut};

/// Alignment of every write offset and length: one 4 KiB block.
pub const BLOCK_BYTES: u64 = 4096;
/// Largest single read issued to the device (glommio issue #633: very large
/// reads can hang).
pub const READ_CHUNK_BYTES: usize = 128 << 10;

/// A failed I/O operation: which operation, on which path, and the OS error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct IoError {
    pub op: &'static str,
    pub path: String,
    pub source: Arc<std::io::Error>,
}

impl IoError {
    pub fn new(op: &'static str, path: impl Into<String>, source: std::io::Error) -> Self {
        Self {
            op,
            path: path.into(),
            source: Arc::new(source),
        }
    }

    /// The OS error number, where there is one (EIO is 5, ENOSPC 28).
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// A directory of files. Names are plain file names, no paths.
#[allow(async_fn_in_trait)]
pub trait Storage {
    type File: StorageFile;

    /// Opens an existing file for reading and writing.
    async fn open(&self, name: &str) -> Result<Self::File, IoError>;
    /// Creates a file (truncating one that exists). The name is durable only
    /// after [`Storage::sync_dir`].
    async fn create(&self, name: &str) -> Result<Self::File, IoError>;
    /// Creates a file as [`Storage::create`] does, but whose writes become
    /// durable only at [`StorageFile::sync`], never one by one (no
    /// `O_DSYNC`): for a file written whole and then synced once, as a
    /// zero-filled spare segment is.
    async fn create_sync_at_end(&self, name: &str) -> Result<Self::File, IoError> {
        self.create(name).await
    }
    /// The names of the files in the directory, sorted.
    async fn list(&self) -> Result<Vec<String>, IoError>;
    /// Removes a file; durable after [`Storage::sync_dir`].
    async fn remove(&self, name: &str) -> Result<(), IoError>;
    /// Renames a file, replacing `to`; durable after [`Storage::sync_dir`].
    async fn rename(&self, from: &str, to: &str) -> Result<(), IoError>;
    /// Makes creates, renames and removes durable.
    async fn sync_dir(&self) -> Result<(), IoError>;
}

/// One open file. Writes are block-aligned: `pos` is a multiple of
/// [`BLOCK_BYTES`] and the written bytes are zero-padded up to the next one.
#[allow(async_fn_in_trait)]
pub trait StorageFile {
    /// Writes the concatenation of `parts` at `pos`, zero-padded to a block.
    async fn write_at(&self, pos: u64, parts: &[&[u8]]) -> Result<(), IoError>;
    /// Writes `bytes` at `pos`, zero-padded to a block, as `write_at` does.
    /// Bytes that start on a block boundary and fill whole blocks (a slice
    /// of an [`AlignedBuf`]) may be handed to the device as they are, with
    /// no copy; the default copies.
    async fn write_shared(&self, pos: u64, bytes: Bytes) -> Result<(), IoError> {
        self.write_at(pos, &[&bytes]).await
    }
    /// Reads up to `len` bytes at `pos`; shorter only at the end of the file.
    async fn read_at(&self, pos: u64, len: usize) -> Result<Vec<u8>, IoError>;
    /// `fdatasync`: what was written is durable when this returns Ok.
    async fn sync(&self) -> Result<(), IoError>;
    /// The file's length in bytes.
    async fn file_size(&self) -> Result<u64, IoError>;
    /// Reserves `len` bytes without writing them (`fallocate`).
    async fn allocate(&self, len: u64) -> Result<(), IoError>;
}

/// Takes an exclusive `flock` on `dir/LOCK`, held as long as the returned
/// file is open; `None` when another process (or another open of it) holds
/// it. Two logs over one directory would overwrite each other's segments.
pub fn lock_dir(dir: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    // SAFETY: flock on a descriptor we own; no memory is touched.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    Ok(locked.then_some(file))
}

/// Reads a whole file in chunks of at most [`READ_CHUNK_BYTES`].
pub async fn read_all<F: StorageFile>(file: &F) -> Result<Vec<u8>, IoError> {
    let len = file.file_size().await?;
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let want = READ_CHUNK_BYTES.min((len - out.len() as u64) as usize);
        let chunk = file.read_at(out.len() as u64, want).await?;
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Bytes per write of a zero fill that is needed soon.
const ZERO_FILL_FAST: u64 = 1 << 20;
/// Bytes per write of a zero fill that is ahead (see [`zero_fill`]).
pub const ZERO_FILL_GENTLE: u64 = 128 << 10;

/// How a zero fill goes on, asked before each of its writes.
pub enum ZeroPace {
    /// Needed now (the log waits, or is about to): two 1 MiB writes at a
    /// time, which the device takes faster than one.
    Urgent,
    /// Needed soon: 1 MiB writes, one at a time.
    Fast,
    /// Ahead: 128 KiB writes.
    Gentle,
    /// Far enough ahead: wait for this, then ask again.
    Wait(std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>),
}

/// Writes `len` zero bytes from offset 0, then syncs: a file whose every
/// block is written, so later `fdatasync`s need no journal commit for
/// unwritten-extent conversion. The writes share one aligned buffer of zeros
/// (no copy per write).
///
/// Before each write, `pace(offset)` says how to go on. Unless the file is
/// needed soon, the zeros go in small writes, and not back to back: on a
/// device without FUA every O_DSYNC write of a log beside it ends in a
/// cache flush, which also has to carry the zeros written since the last
/// one, so zeros written at the device's full speed show up as stalls in
/// the log's commits.
pub async fn zero_fill<F: StorageFile>(
    file: &F,
    len: u64,
    pace: impl Fn(u64) -> ZeroPace,
) -> Result<(), IoError> {
    let mut zeros = AlignedBuf::with_capacity(ZERO_FILL_FAST as usize);
    zeros.extend_zeros(ZERO_FILL_FAST as usize);
    let (zeros, _) = zeros.share();
    let mut pos = 0;
    while pos < len {
        let chunk = match pace(pos) {
            ZeroPace::Urgent if pos + ZERO_FILL_FAST < len => {
                let m = ZERO_FILL_FAST.min(len - pos - ZERO_FILL_FAST);
                let (a, b) = futures_lite::future::zip(
                    file.write_shared(pos, zeros.clone()),
                    file.write_shared(pos + ZERO_FILL_FAST, zeros.slice(..m as usize)),
                )
                .await;
                a.and(b)?;
                pos += ZERO_FILL_FAST + m;
                continue;
            }
            ZeroPace::Urgent | ZeroPace::Fast => ZERO_FILL_FAST,
            ZeroPace::Gentle => ZERO_FILL_GENTLE,
            ZeroPace::Wait(until) => {
                until.await;
                continue;
            }
        };
        let n = chunk.min(len - pos);
        file.write_shared(pos, zeros.slice(..n as usize)).await?;
        pos += n;
    }
    file.sync().await
}
