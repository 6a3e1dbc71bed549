//! The production backend: glommio `DmaFile`s (O_DIRECT, io_uring).

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use glommio::io::{DmaFile, OpenOptions};

use super::{BLOCK_BYTES, IoError, READ_CHUNK_BYTES, Storage, StorageFile};

/// Whether a directory without working `O_DIRECT` may hold a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectIo {
    /// Refuse to open a directory where `O_DIRECT` is not in effect.
    Require,
    /// Run with buffered I/O there (tests on tmpfs, demos). Writes are still
    /// synced, but the page cache sits between the log and the disk.
    AllowBuffered,
}

/// Name of the small file written at open to check `O_DIRECT` and to make
/// sure the first DMA file glommio opens on the device is not empty (glommio
/// issues #605 and #670: DMA reads can then fail with "Operation not supported").
const PROBE_FILE: &str = ".direct-io-probe";

/// A directory of `O_DIRECT` files. Clones name the same directory.
/// How [`DmaStorage`] makes a write durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Files are opened `O_DSYNC`: each write is durable when it completes
    /// (the device gets a FUA write or a flush with it), and `sync` has
    /// nothing left to do. One round trip per batch instead of two; measured
    /// faster at every concurrency (see the commit that made it the default).
    #[default]
    Dsync,
    /// Plain O_DIRECT writes, then `fdatasync`.
    Fdatasync,
}

#[derive(Debug, Clone)]
pub struct DmaStorage {
    dir: PathBuf,
    direct_io: bool,
    dsync: bool,
}

/// A file of [`DmaStorage`].
#[derive(Debug)]
pub struct DmaFileHandle {
    file: DmaFile,
    path: String,
    dsync: bool,
    /// The next `sync` must `fdatasync` even with O_DSYNC writes: after an
    /// `allocate` (a size change writes do not cover) and, once, for a file
    /// opened rather than created.
    metadata_dirty: std::cell::Cell<bool>,
}

fn glommio_err(op: &'static str, path: &Path, err: glommio::GlommioError<()>) -> IoError {
    IoError::new(op, path.display().to_string(), err.into())
}

fn std_err(op: &'static str, path: &Path, err: std::io::Error) -> IoError {
    IoError::new(op, path.display().to_string(), err)
}

impl DmaStorage {
    /// Opens (creating if needed) `dir`. Must run inside a glommio executor.
    pub async fn open(dir: impl AsRef<Path>, policy: DirectIo) -> Result<Self, IoError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| std_err("create_dir", &dir, e))?;
            // The new entry must survive a power cut, or the directory comes
            // back missing and a log that held data reopens empty.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::File::open(parent)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| std_err("sync_dir", parent, e))?;
            }
        }
        // glommio opens with `openat(-1, path)`: a relative path fails with
        // EBADF, so every path it sees is absolute.
        let dir = std::fs::canonicalize(&dir).map_err(|e| std_err("canonicalize", &dir, e))?;
        let probe = dir.join(PROBE_FILE);
        std::fs::write(&probe, vec![0xa5u8; BLOCK_BYTES as usize])
            .map_err(|e| std_err("write", &probe, e))?;
        let file = OpenOptions::new()
            .read(true)
            .dma_open(&probe)
            .await
            .map_err(|e| glommio_err("open", &probe, e))?;
        let direct_io = o_direct_in_effect(&file);
        // A close error on a read-only probe changes nothing.
        let _ = file.close().await;
        if !direct_io && policy == DirectIo::Require {
            return Err(std_err(
                "O_DIRECT check",
                &dir,
                std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "O_DIRECT is not in effect on this filesystem (tmpfs?): refusing a \
                     durable log here; allow buffered I/O explicitly to run anyway",
                ),
            ));
        }
        if !direct_io {
            tracing::warn!(dir = %dir.display(), "O_DIRECT not in effect; running with buffered I/O");
        }
        Ok(Self {
            dir,
            direct_io,
            dsync: true,
        })
    }

    /// How writes are made durable; [`SyncMode::Dsync`] unless changed.
    pub fn with_sync_mode(mut self, mode: SyncMode) -> Self {
        self.dsync = mode == SyncMode::Dsync;
        self
    }

    pub fn sync_mode(&self) -> SyncMode {
        if self.dsync {
            SyncMode::Dsync
        } else {
            SyncMode::Fdatasync
        }
    }

    /// Whether writes bypass the page cache.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    async fn open_with(
        &self,
        name: &str,
        create: bool,
        dsync: bool,
    ) -> Result<DmaFileHandle, IoError> {
        let path = self.dir.join(name);
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if dsync {
            options.custom_flags(libc::O_DSYNC);
        }
        if create {
            options.create(true).truncate(true);
        }
        let op = if create { "create" } else { "open" };
        let file = options
            .dma_open(&path)
            .await
            .map_err(|e| glommio_err(op, &path, e))?;
        Ok(DmaFileHandle {
            file,
            path: path.display().to_string(),
            dsync,
            // A file opened again may hold bytes an earlier run wrote
            // without O_DSYNC (or a crash left in the device cache): its
            // first sync is a real one.
            metadata_dirty: std::cell::Cell::new(!create),
        })
    }
}

/// Reads the flags the kernel really applied: glommio drops O_DIRECT without
/// a word on filesystems that refuse it.
fn o_direct_in_effect(file: &DmaFile) -> bool {
    // SAFETY: F_GETFL on an open descriptor has no memory effects.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

impl Storage for DmaStorage {
    type File = DmaFileHandle;

    async fn open(&self, name: &str) -> Result<DmaFileHandle, IoError> {
        self.open_with(name, false, self.dsync).await
    }

    async fn create(&self, name: &str) -> Result<DmaFileHandle, IoError> {
        self.open_with(name, true, self.dsync).await
    }

    /// Without O_DSYNC: each write of a zero-filled spare used to wait for a
    /// device cache flush (no FUA on the development VM), 64 per segment.
    async fn create_sync_at_end(&self, name: &str) -> Result<DmaFileHandle, IoError> {
        self.open_with(name, true, false).await
    }

    async fn list(&self) -> Result<Vec<String>, IoError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| std_err("list", &self.dir, e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| std_err("list", &self.dir, e))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    async fn remove(&self, name: &str) -> Result<(), IoError> {
        let path = self.dir.join(name);
        glommio::io::remove(&path)
            .await
            .map_err(|e| glommio_err("remove", &path, e))
    }

    async fn rename(&self, from: &str, to: &str) -> Result<(), IoError> {
        let (from, to) = (self.dir.join(from), self.dir.join(to));
        glommio::io::rename(&from, &to)
            .await
            .map_err(|e| glommio_err("rename", &from, e))
    }

    async fn sync_dir(&self) -> Result<(), IoError> {
        let dir = glommio::io::Directory::open(&self.dir)
            .await
            .map_err(|e| glommio_err("open_dir", &self.dir, e))?;
        let synced = dir.sync().await;
        let _ = dir.close().await;
        synced.map_err(|e| glommio_err("sync_dir", &self.dir, e))
    }
}

impl DmaFileHandle {
    fn err(&self, op: &'static str, err: glommio::GlommioError<()>) -> IoError {
        IoError::new(op, self.path.clone(), err.into())
    }

    /// A short O_DIRECT write is treated as a failed one: the caller never
    /// acks past it, so no retry is attempted here.
    fn check_written(&self, written: usize, len: usize) -> Result<(), IoError> {
        if written == len {
            return Ok(());
        }
        Err(IoError::new(
            "write",
            self.path.clone(),
            std::io::Error::new(std::io::ErrorKind::WriteZero, "short write"),
        ))
    }
}

impl StorageFile for DmaFileHandle {
    async fn write_at(&self, pos: u64, parts: &[&[u8]]) -> Result<(), IoError> {
        assert_eq!(pos % BLOCK_BYTES, 0, "unaligned write at {pos}");
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let padded = len.next_multiple_of(BLOCK_BYTES as usize);
        let mut buf = self.file.alloc_dma_buffer(padded);
        let bytes = buf.as_bytes_mut();
        let mut at = 0;
        for part in parts {
            bytes[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        bytes[at..].fill(0);
        let written = self
            .file
            .write_at(buf, pos)
            .await
            .map_err(|e| self.err("write", e))?;
        self.check_written(written, padded)
    }

    async fn write_shared(&self, pos: u64, bytes: Bytes) -> Result<(), IoError> {
        let block = BLOCK_BYTES as usize;
        if !(bytes.as_ptr() as usize).is_multiple_of(block) || !bytes.len().is_multiple_of(block) {
            return self.write_at(pos, &[&bytes]).await;
        }
        assert_eq!(pos % BLOCK_BYTES, 0, "unaligned write at {pos}");
        let len = bytes.len();
        // No copy: the device reads the shared bytes, which stay alive and
        // unchanged until the write completes.
        let written = self
            .file
            .write_foreign_at(bytes, pos)
            .await
            .map_err(|e| self.err("write", e))?;
        self.check_written(written, len)
    }

    async fn read_at(&self, pos: u64, len: usize) -> Result<Vec<u8>, IoError> {
        // Every chunk is issued at once. Issued one after another, each
        // waited behind the log's own writes and flushes: a replication
        // sender catching up from the segments under load got about 92 MB/s
        // that way.
        let chunks = (0..len).step_by(READ_CHUNK_BYTES).map(|off| {
            let want = READ_CHUNK_BYTES.min(len - off);
            let read = self.file.read_at(pos + off as u64, want);
            async move { (want, read.await) }
        });
        let mut out = Vec::with_capacity(len);
        for (want, chunk) in join_all(chunks.collect()).await {
            let chunk = chunk.map_err(|e| self.err("read", e))?;
            out.extend_from_slice(&chunk);
            if chunk.len() < want {
                // The file ends here. glommio 0.9 returns an unaligned read
                // that reaches the end up to a sector past it (zeros): keep
                // only what the file holds.
                let size = self.file_size().await?;
                out.truncate(size.saturating_sub(pos).min(out.len() as u64) as usize);
                break;
            }
        }
        Ok(out)
    }

    async fn sync(&self) -> Result<(), IoError> {
        if self.dsync && !self.metadata_dirty.replace(false) {
            return Ok(());
        }
        self.file.fdatasync().await.map_err(|e| self.err("sync", e))
    }

    async fn file_size(&self) -> Result<u64, IoError> {
        self.file.file_size().await.map_err(|e| self.err("stat", e))
    }

    async fn allocate(&self, len: u64) -> Result<(), IoError> {
        self.metadata_dirty.set(true);
        self.file
            .pre_allocate(len, false)
            .await
            .map_err(|e| self.err("allocate", e))
    }
}

/// Runs every future at once on this task; their outputs, in order.
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *output = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
}
