//! The engine: shards composed of a WAL and a state machine.
//!
//! For now one [`Shard`] lives on one glommio executor; the multi-core engine
//! (shards spread over pinned executors, a `Send + Sync` handle, snapshots)
//! builds on it.

mod shard;

pub use shard::{CommitLevel, EngineError, OpenReport, Shard, ShardReceipt};
