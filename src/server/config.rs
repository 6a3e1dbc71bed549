//! `tidewal node` configuration: a TOML file, with command-line flags on
//! top. Unknown keys are an error, so a typo is not silently ignored.
//!
//! ```toml
//! data_dir = "/var/lib/tidewal"
//! listen = "0.0.0.0:6379"
//! admin = "127.0.0.1:9121"
//! node_id = "node-a"
//! shards = 8
//! commit_level = "replicated(1)"
//! commit_timeout_ms = 5000
//! commit_policy = "fail"
//!
//! [limits]
//! connections_max = 10000
//!
//! [engine]
//! segment_bytes = 67108864
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::commit::{Commit, TimeoutPolicy};
use crate::engine::Options;

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
    /// Level every write waits for, unless its connection chose another
    /// (`memory`, `local`, `replicated(k)`, `all`, `applied(k)`).
    pub commit_level: Commit,
    /// How long a write waits for the replicas its level needs.
    pub commit_timeout_ms: u64,
    /// What a write gets when they do not answer in time: `fail` (an
    /// error naming the level reached) or `degrade` (success at the level
    /// reached, reported as degraded).
    pub commit_policy: TimeoutPolicy,
    /// `HOST:PORT` of the node to follow as a read-only replica; empty for
    /// a primary.
    pub replica_of: String,
    /// A replica that serves no reads (warm standby): it replicates and
    /// can be promoted, and answers reads with `-STANDBY`.
    pub warm_standby: bool,
    /// The other data nodes (`HOST:PORT` of their client ports), for
    /// automatic failover: with peers, a replica that stops hearing its
    /// primary stands in an election, and a primary steps down for one
    /// elected in a newer epoch. Empty: failover is by `REPLICAOF` only.
    pub peers: Vec<String>,
    /// Milliseconds of silence from the upstream (records and heartbeats,
    /// one every 500 ms) before a replica with peers stands in an
    /// election; each waits a random part of it more.
    pub election_timeout_ms: u64,
    /// Whether this node stands in elections (with peers). A node that
    /// does not still votes, and follows whoever is elected: for a replica
    /// that should never be primary (a remote one, a small one).
    pub failover_candidate: bool,
    /// A shell command (`sh -c`) run each time this node becomes the
    /// primary (elected, or `REPLICAOF NO ONE`): to point DNS, a virtual
    /// IP or service discovery at it. It gets `TIDEWAL_LISTEN`,
    /// `TIDEWAL_NODE_ID`, `TIDEWAL_EPOCH` and `TIDEWAL_REASON`
    /// (`elected` or `replicaof`); the node does not wait for it, and logs
    /// how it ended. Empty: none.
    pub on_promote: String,
    /// Where this node also answers as a Redis Sentinel (`HOST:PORT`; empty:
    /// not at all): clients that find their primary through Sentinel,
    /// given every node's Sentinel address, find it here, also after a
    /// failover (`sentinel.rs`). A port of its own, as Sentinel's is: on it
    /// `ROLE` says `sentinel`, which such clients check.
    pub sentinel: String,
    /// The name the cluster goes by there (Sentinel's master name).
    pub sentinel_name: String,
    pub limits: Limits,
    /// When a replica's lag raises an alert on the status page.
    pub lag_alert: LagAlert,
    /// Snapshots and WAL release, and what is kept for replicas.
    pub retention: Retention,
    /// Microseconds an idle executor keeps polling for work before it
    /// sleeps (the engine's `spin_before_park_us`). A node is a dedicated
    /// server: the default, 200, covers a disk sync and a client's round
    /// trip, so a lightly loaded node answers without the wake-up of a
    /// sleeping thread (SET at 1 client against Redis in
    /// `tools/bench-redis.sh`: 0.93x without, 1.10-1.19x with); an idle
    /// node still sleeps. 0 sleeps at once. Only pinned executors spin, and
    /// not with `[engine] sync_mode = "fdatasync"` (see
    /// `Options::effective_spin_us`).
    pub spin_us: u64,
    /// Engine options; `shard_count`, `commit_level` and
    /// `spin_before_park_us` come from above.
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
            commit_level: Commit::Local,
            commit_timeout_ms: 5_000,
            commit_policy: TimeoutPolicy::Fail,
            replica_of: String::new(),
            warm_standby: false,
            peers: Vec::new(),
            election_timeout_ms: 2_000,
            failover_candidate: true,
            on_promote: String::new(),
            sentinel: String::new(),
            sentinel_name: "tidewal".to_string(),
            limits: Limits::default(),
            lag_alert: LagAlert::default(),
            retention: Retention::default(),
            spin_us: 200,
            engine: Options::default(),
        }
    }
}

/// When the node snapshots its shards and releases their WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// A shard is snapshotted once its log has grown this much since its
    /// last snapshot; then its WAL below the older of its two newest
    /// snapshots is released. 0 never snapshots (the WAL grows for ever).
    pub snapshot_every_bytes: u64,
    /// WAL kept for replicas behind the snapshots, at most: a replica
    /// further behind than this is re-synced from a snapshot instead.
    pub downstream_bytes_max: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            snapshot_every_bytes: 256 << 20,
            downstream_bytes_max: 1 << 30,
        }
    }
}

/// Lag thresholds for the status page's alerts. An alert is raised when a
/// replica is more than `bytes` or `seconds` behind, and cleared only once
/// it is back under `clear_ratio` of both (hysteresis, so a replica that
/// hovers at a threshold does not flap).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LagAlert {
    pub bytes: u64,
    pub seconds: f64,
    pub clear_ratio: f64,
}

impl Default for LagAlert {
    fn default() -> Self {
        Self {
            bytes: 64 << 20,
            seconds: 10.0,
            clear_ratio: 0.5,
        }
    }
}

impl LagAlert {
    /// Updates an alert's state `on` from the lag now; returns it.
    pub fn update(&self, on: &mut bool, lag_bytes: u64, lag_seconds: f64) -> bool {
        if *on {
            let clear = lag_bytes as f64 <= self.bytes as f64 * self.clear_ratio
                && lag_seconds <= self.seconds * self.clear_ratio;
            if clear {
                *on = false;
            }
        } else if lag_bytes > self.bytes || lag_seconds > self.seconds {
            *on = true;
        }
        *on
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
        if self.commit_timeout_ms == 0 {
            return bad("commit_timeout_ms must be above 0".into());
        }
        if let Some(peer) = self
            .peers
            .iter()
            .find(|p| !super::failover::is_host_port(p))
        {
            return bad(format!("peers: {peer:?} is not HOST:PORT"));
        }
        if !self.sentinel.is_empty() {
            // Bound with SO_REUSEPORT like the others: on the same address
            // it would silently take a share of their connections.
            use std::net::ToSocketAddrs;
            let resolve = |a: &str| a.to_socket_addrs().ok().and_then(|mut x| x.next());
            let Some(sentinel) = resolve(&self.sentinel) else {
                return bad(format!("sentinel = {:?} is not HOST:PORT", self.sentinel));
            };
            for (what, other) in [("listen", &self.listen), ("admin", &self.admin)] {
                let overlaps = |o: std::net::SocketAddr| {
                    o.port() == sentinel.port()
                        && (o.ip() == sentinel.ip()
                            || o.ip().is_unspecified()
                            || sentinel.ip().is_unspecified())
                };
                if sentinel.port() != 0 && resolve(other).is_some_and(overlaps) {
                    return bad(format!(
                        "sentinel = {:?} is the address of {what} = {other:?}",
                        self.sentinel
                    ));
                }
            }
        }
        if self.sentinel_name.is_empty() || self.sentinel_name.len() > 255 {
            return bad(format!(
                "sentinel_name = {:?} must be 1 to 255 bytes",
                self.sentinel_name
            ));
        }
        if self.election_timeout_ms > 3_600_000 {
            return bad(format!(
                "election_timeout_ms = {} is over an hour",
                self.election_timeout_ms
            ));
        }
        if self.election_timeout_ms < 1_000 {
            // Under two heartbeats, a replica would stand while its primary
            // is up.
            return bad(format!(
                "election_timeout_ms = {} must be at least 1000 (two heartbeats)",
                self.election_timeout_ms
            ));
        }
        if self.engine.spin_before_park_us != 0 {
            // It would be replaced by `spin_us` without a word.
            return bad(format!(
                "[engine] spin_before_park_us = {} is set by the node's `spin_us` (--spin-us) instead",
                self.engine.spin_before_park_us
            ));
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
        options.commit_level = self.commit_level.engine_level();
        options.spin_before_park_us = self.spin_us;
        // A replica's records are also its upstream's: damage at the end
        // of its logs is cut and fetched again.
        options.tail_refetchable |= !self.replica_of.is_empty();
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
        assert_eq!(config.commit_level, Commit::Memory);
        let levels = NodeConfig::from_toml(
            "commit_level = \"replicated(2)\"\ncommit_policy = \"degrade\"\n",
        )
        .unwrap();
        assert_eq!(levels.commit_level, Commit::Replicated(2));
        assert_eq!(levels.commit_policy, TimeoutPolicy::Degrade);
        let err = NodeConfig::from_toml("commit_level = \"replicated(0)\"").unwrap_err();
        assert!(err.to_string().contains("replicated(k)"), "{err}");
        assert_eq!(config.limits.connections_max, 5);
        config.check().unwrap();
        let spin = NodeConfig::from_toml("spin_us = 50\n").unwrap();
        assert_eq!(spin.engine_options().spin_before_park_us, 50);
        let err = NodeConfig::from_toml("[engine]\nspin_before_park_us = 50\n")
            .unwrap()
            .check()
            .unwrap_err();
        assert!(err.to_string().contains("spin_us"), "{err}");
        let err = NodeConfig::from_toml("listne = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
        let bad = NodeConfig {
            listen: "nowhere".into(),
            ..NodeConfig::default()
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn lag_alerts_have_hysteresis() {
        let alert = LagAlert {
            bytes: 100,
            seconds: 10.0,
            clear_ratio: 0.5,
        };
        let mut on = false;
        assert!(
            !alert.update(&mut on, 100, 10.0),
            "at the threshold: not yet"
        );
        assert!(alert.update(&mut on, 101, 0.0));
        assert!(
            alert.update(&mut on, 60, 0.0),
            "above the clear level: stays"
        );
        assert!(
            alert.update(&mut on, 10, 6.0),
            "seconds above the clear level: stays"
        );
        assert!(!alert.update(&mut on, 50, 5.0), "both under: cleared");
        assert!(alert.update(&mut on, 0, 11.0));
    }
}
