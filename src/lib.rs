//! tidewal: a replicated storage engine for Linux NVMe hosts, on glommio.
//!
//! # Layout
//!
//! Read in this order; dependencies point down the list only.
//!
//! 1. [`format`]: the bytes on disk and on the wire. Pure codecs (no I/O, no
//!    async) of the segment header and the WAL record: zerocopy structs whose
//!    doc comments are the format spec. The fuzzers hit this layer.
//! 2. [`io`]: the [`io::Storage`] trait, the only way anything above touches a
//!    disk. Production backend: glommio `DmaFile` (O_DIRECT, io_uring).
//!    Test backend: an in-memory filesystem that can lose unsynced writes,
//!    tear the last write, flip bits and fail chosen operations.
//! 3. [`wal`]: one shard's write-ahead log: segments, the group-commit
//!    writer, the reader, recovery (a decision table) and retention.
//! 4. [`state`]: state machines applied from WAL records; the default
//!    ordered key-value map and the operation codec of its records.
//! 5. [`engine`]: a shard (WAL + state) with commit levels; the multi-core
//!    engine and its embedded API build on it.
//!
//! The storage engine, replication, failover and the server are built on
//! these (see ARCHITECTURE.md for the plan and the numbered write path).

pub mod engine;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod server;
pub mod state;
pub mod wal;

pub use format::{LogId, RecordKind};
pub use io::{DirectIo, DmaStorage, FaultStorage, Storage};
pub use wal::{Receipt, RecoveryReport, Wal, WalError, WalOptions};
