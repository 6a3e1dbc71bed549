//! Engine options: a builder with `with_*` methods, loadable from TOML.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::CommitLevel;
use crate::io::SyncMode;

/// How an engine is opened. Units are last in every name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Logical shards; fixed when the data directory is created (a later
    /// open uses the stored number). 0 means one per executor.
    pub shard_count: u32,
    /// Executors (threads pinned to cores); 0 means one per available core.
    pub executor_count: u32,
    /// Level a write waits for unless it asks for another.
    pub commit_level: CommitLevel,
    /// WAL segment file size.
    pub segment_bytes: u64,
    /// Most record bytes one WAL write + sync carries.
    pub batch_bytes_max: usize,
    /// Most WAL writes of a shard on the device at once
    /// (`WalOptions::writes_in_flight`): above 1, busy batches are padded to
    /// a block boundary so the next can be written beside them. 1: one write
    /// at a time, no padding.
    pub wal_writes_in_flight: usize,
    /// Run where O_DIRECT is not in effect (tmpfs), with buffered I/O.
    pub allow_buffered_io: bool,
    /// Pin executor `i` to core `i` (off lets the OS place them).
    pub pin_executors: bool,
    /// Microseconds an idle executor spins before it sleeps: trades CPU for
    /// the latency of waking it from another thread. 0 sleeps at once.
    /// Not with `SyncMode::Fdatasync` (see [`Options::effective_spin_us`]).
    pub spin_before_park_us: u64,
    /// How WAL and snapshot writes are made durable: `dsync` (each write
    /// durable on completion; one device round trip per batch) or
    /// `fdatasync` (write, then sync).
    pub sync_mode: SyncMode,
    /// The logs' records come from an upstream that holds them (this
    /// engine is a replica's): damage at the end of a log is cut and
    /// fetched again rather than refused (`WalOptions::tail_refetchable`).
    /// `tidewal node` sets it when it starts as a replica.
    pub tail_refetchable: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            shard_count: 0,
            executor_count: 0,
            commit_level: CommitLevel::Local,
            segment_bytes: 64 << 20,
            batch_bytes_max: 1 << 20,
            wal_writes_in_flight: 4,
            allow_buffered_io: false,
            pin_executors: true,
            spin_before_park_us: 0,
            sync_mode: SyncMode::Dsync,
            tail_refetchable: false,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid options: {0}")]
pub struct OptionsError(pub String);

impl Options {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_sync_mode(mut self, mode: SyncMode) -> Self {
        self.sync_mode = mode;
        self
    }

    pub fn with_shard_count(mut self, n: u32) -> Self {
        self.shard_count = n;
        self
    }

    pub fn with_executor_count(mut self, n: u32) -> Self {
        self.executor_count = n;
        self
    }

    pub fn with_commit_level(mut self, level: CommitLevel) -> Self {
        self.commit_level = level;
        self
    }

    pub fn with_segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }

    pub fn with_batch_bytes_max(mut self, bytes: usize) -> Self {
        self.batch_bytes_max = bytes;
        self
    }

    pub fn with_allow_buffered_io(mut self, allow: bool) -> Self {
        self.allow_buffered_io = allow;
        self
    }

    pub fn with_spin_before_park_us(mut self, us: u64) -> Self {
        self.spin_before_park_us = us;
        self
    }

    /// What the executors spin: `spin_before_park_us`, or 0 with
    /// `SyncMode::Fdatasync`. io_uring hands an `fdatasync` to a worker
    /// thread on the executor's core, and a polling executor keeps it
    /// waiting: `tidewal bench wal --sync-mode fdatasync` reached 0.41 / 0.48
    /// / 0.37 of its bar at 1 / 64 / 256 appenders polling 200 us, 0.82 /
    /// 0.75 / 0.55 without.
    pub fn effective_spin_us(&self) -> u64 {
        match self.sync_mode {
            SyncMode::Dsync => self.spin_before_park_us,
            SyncMode::Fdatasync => 0,
        }
    }

    pub fn with_pin_executors(mut self, pin: bool) -> Self {
        self.pin_executors = pin;
        self
    }

    /// Parses TOML; unknown keys are an error, missing ones take defaults.
    pub fn from_toml(text: &str) -> Result<Self, OptionsError> {
        toml::from_str(text).map_err(|e| OptionsError(e.to_string()))
    }

    /// Reads and parses a TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self, OptionsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| OptionsError(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// The executor count in effect.
    pub fn executors(&self) -> u32 {
        if self.executor_count > 0 {
            self.executor_count
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
        }
    }

    pub fn check(&self) -> Result<(), OptionsError> {
        if !self.segment_bytes.is_multiple_of(4096)
            || self.segment_bytes < 8192
            || self.segment_bytes > 1 << 30
        {
            return Err(OptionsError(format!(
                "segment_bytes {} must be a multiple of 4096 between 8 KiB and 1 GiB",
                self.segment_bytes
            )));
        }
        if self.batch_bytes_max == 0 {
            return Err(OptionsError("batch_bytes_max must be positive".into()));
        }
        if self.wal_writes_in_flight == 0 {
            return Err(OptionsError("wal_writes_in_flight must be positive".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Executors poll as configured with O_DSYNC writes, never with
    /// fdatasync (as a config file sets it).
    #[test]
    fn executors_do_not_poll_in_fdatasync_mode() {
        let dsync = Options::from_toml("spin_before_park_us = 200").unwrap();
        assert_eq!(dsync.effective_spin_us(), 200);
        let fdatasync =
            Options::from_toml("spin_before_park_us = 200\nsync_mode = \"fdatasync\"").unwrap();
        assert_eq!(fdatasync.sync_mode, SyncMode::Fdatasync);
        assert_eq!(fdatasync.effective_spin_us(), 0);
    }

    #[test]
    fn toml_round_trip_defaults_and_typos() {
        let o = Options::from_toml("shard_count = 8\ncommit_level = \"memory\"\n").unwrap();
        assert_eq!(o.shard_count, 8);
        assert_eq!(o.commit_level, CommitLevel::Memory);
        assert_eq!(o.segment_bytes, Options::default().segment_bytes);
        let err = Options::from_toml("shard_cuont = 8").unwrap_err();
        assert!(err.to_string().contains("shard_cuont"), "{err}");
        assert!(Options::from_toml("segment_bytes = \"big\"").is_err());
        let one_write = Options::from_toml("wal_writes_in_flight = 1").unwrap();
        assert_eq!(one_write.wal_writes_in_flight, 1);
        assert!(one_write.check().is_ok());
        let none = Options::from_toml("wal_writes_in_flight = 0").unwrap();
        assert!(
            none.check()
                .unwrap_err()
                .to_string()
                .contains("wal_writes_in_flight")
        );
        let text = toml::to_string(&Options::default().with_shard_count(3)).unwrap();
        assert_eq!(Options::from_toml(&text).unwrap().shard_count, 3);
    }
}
