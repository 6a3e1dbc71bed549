//! The engine: shards composed of a WAL and a state machine, spread over
//! one pinned glommio executor per core, behind a `Send + Sync` handle.
//!
//! - `shard`: one shard (WAL + key-value state + snapshots) on one executor.
//! - `handle`: the multi-core [`Engine`] and its request routing.
//! - `mailbox`: the lock-free queue that carries requests into an executor.
//! - `options`: [`Options`], a builder loadable from TOML.

mod handle;
mod install;
mod mailbox;
mod options;
mod rewind;
mod shard;

pub use handle::{Answer, BatchAtomicity, BatchOp, Engine, ShardStats, allowed_cpus, block_on};
pub use options::{Options, OptionsError};
pub use shard::{CommitLevel, EngineError, OpenReport, Shard, ShardReceipt, Update};
