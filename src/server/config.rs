//! `tidewal node` configuration: a TOML file, with command-line flags on
//! top. Unknown keys are an error, so a typo is not silently ignored.
//!
//! ```toml
//! data_dir = "/var/lib/tidewal"
//! listen = "0.0.0.0:6379"
//! admin = "127.0.0.1:9121"
//! node_id = "node-a"
//! shards = 8
//! commit_level = "local"
//!
//! [limits]
//! connections_max = 10000
//!
//! [engine]
//! segment_bytes = 67108864
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::{CommitLevel, Options};

/// Everything a node is started with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// Where clients connect (RESP2).
    pub listen: String,
    /// Where the admin HTTP endpoint listens; empty turns it off.
    pub admin: String,
    /// This node's name in status pages; defaults to the listen address.
    pub node_id: String,
    /// Shards, fixed when the data directory is created; 0 = one per core.
    pub shards: u32,
    /// Level every write waits for.
    pub commit_level: CommitLevel,
    /// `HOST:PORT` of the node to follow as a read-only replica; empty for
    /// a primary.
    pub replica_of: String,
    pub limits: Limits,
    /// Engine options; `shard_count` and `commit_level` come from above.
    pub engine: Options,
}

/// What one client may cost the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Clients connected at once; more are told so and closed.
    pub connections_max: usize,
    /// Longest key or value.
    pub bulk_bytes_max: usize,
    /// Most arguments in one command (`MSET`, `MGET`, `DEL`).
    pub args_max: usize,
    /// Bytes a client may have sent and the node not yet parsed (one
    /// command in progress); beyond it the connection is closed.
    pub query_buffer_bytes_max: usize,
    /// Reply bytes held for a client before they are written out.
    pub reply_buffer_bytes_max: usize,
    /// Milliseconds a shutdown waits for clients to finish what they sent.
    pub shutdown_grace_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections_max: 10_000,
            // A key and its value share one WAL record (16 MiB at most).
            bulk_bytes_max: 8 << 20,
            args_max: 1 << 16,
            query_buffer_bytes_max: 64 << 20,
            reply_buffer_bytes_max: 64 << 20,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("tidewal-data"),
            listen: "127.0.0.1:6379".into(),
            admin: "127.0.0.1:9121".into(),
            node_id: String::new(),
            shards: 0,
            commit_level: CommitLevel::Local,
            replica_of: String::new(),
            limits: Limits::default(),
            engine: Options::default(),
        }
    }
}

/// A configuration that cannot be used, with what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse { path: String, error: String },
    #[error("{0}")]
    Invalid(String),
}

impl NodeConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "config".into(),
            error: e.to_string(),
        })
    }

    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            error: e.to_string(),
        })
    }

    /// Checks what can be checked before anything starts.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |what: String| Err(ConfigError::Invalid(what));
        let resolves = |addr: &str| {
            use std::net::ToSocketAddrs;
            addr.to_socket_addrs().is_ok_and(|mut a| a.next().is_some())
        };
        if !resolves(&self.listen) {
            return bad(format!("listen = {:?} is not HOST:PORT", self.listen));
        }
        if !self.admin.is_empty() && !resolves(&self.admin) {
            return bad(format!("admin = {:?} is not HOST:PORT", self.admin));
        }
        let l = &self.limits;
        if l.connections_max == 0 || l.args_max == 0 || l.bulk_bytes_max == 0 {
            return bad("limits must be above 0".into());
        }
        if l.query_buffer_bytes_max < l.bulk_bytes_max + 1024 {
            return bad(format!(
                "limits.query_buffer_bytes_max ({}) must hold the longest bulk string ({}) and its framing",
                l.query_buffer_bytes_max, l.bulk_bytes_max
            ));
        }
        self.engine_options()
            .check()
            .map_err(|e| ConfigError::Invalid(e.0))
    }

    /// The engine options this node opens its data directory with.
    pub fn engine_options(&self) -> Options {
        let mut options = self.engine.clone();
        options.shard_count = self.shards;
        options.commit_level = self.commit_level;
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let config = NodeConfig::from_toml(
            "data_dir = \"/d\"\nlisten = \"127.0.0.1:7000\"\nshards = 4\ncommit_level = \"memory\"\n[limits]\nconnections_max = 5\n",
        )
        .unwrap();
        assert_eq!(config.shards, 4);
        assert_eq!(config.commit_level, CommitLevel::Memory);
        assert_eq!(config.limits.connections_max, 5);
        config.check().unwrap();
        let err = NodeConfig::from_toml("listne = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
        let bad = NodeConfig {
            listen: "nowhere".into(),
            ..NodeConfig::default()
        };
        assert!(bad.check().is_err());
    }
}
