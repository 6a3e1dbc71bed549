//! The server: `tidewal node`, the engine behind the Redis protocol and an
//! admin HTTP endpoint.
//!
//! - `resp`: the RESP2 parser (limits checked before lengths are trusted)
//!   and reply encoder.
//! - `conn`: one client connection; the commands.
//! - `glob`: Redis glob patterns for `SCAN MATCH` and `KEYS`.
//! - `info`: the `INFO` text.
//! - `admin`: `/admin/replication/status`, `/metrics`, `/healthz`, `/readyz`,
//!   `POST /admin/replication/resync`.
//! - `replication`: WAL streaming to and from other nodes.
//! - `commit`: commit levels that wait for replicas, and the timeout policy.
//! - `config`: [`NodeConfig`], from TOML and flags.
//!
//! Every executor (core) of the engine accepts clients on the same port
//! (`SO_REUSEPORT`; the kernel spreads connections), so a connection is
//! served on one core and reaches each key's shard through the engine's
//! mailboxes. The admin endpoint runs on the first executor.

mod admin;
mod backup;
mod commit;
mod config;
mod conn;
mod failover;
pub mod glob;
mod info;
mod replication;
pub mod resp;
mod sentinel;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

pub use commit::{BadLevel, Commit, TimeoutPolicy};
pub use config::{ConfigError, LagAlert, Limits, NodeConfig, Retention};

use crate::engine::{Engine, EngineError};

/// Counters the node keeps besides the engine's.
#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicUsize,
    pub connections_total: AtomicU64,
    pub rejected: AtomicU64,
    pub commands: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub http_requests: AtomicU64,
    pub http_errors: AtomicU64,
    pub http_connections: AtomicUsize,
}

/// What every connection of a node shares.
pub(crate) struct Shared {
    config: NodeConfig,
    engine: Engine,
    node_id: String,
    /// The client address actually bound (the port is known even when 0
    /// was asked for).
    listen: SocketAddr,
    started: Instant,
    stopping: AtomicBool,
    counters: Counters,
    next_client_id: AtomicU64,
    last_trim_ms: AtomicU64,
    /// The last client left within a second of the last trim, so no trim
    /// ran: the accept loop runs it once the second is over.
    trim_pending: AtomicBool,
    cursors: std::sync::Mutex<conn::Cursors>,
    /// Replicas streaming from this node, by node id.
    downstreams: std::sync::Mutex<std::collections::BTreeMap<String, replication::Downstream>>,
    /// This node's link to the node it follows, when a replica.
    upstream: std::sync::Mutex<replication::Upstream>,
    /// The node this one follows (`HOST:PORT`), empty for a primary; set
    /// at start and by `REPLICAOF`.
    replica_of: std::sync::Mutex<String>,
    /// Whether `replica_of` is set (read on every write).
    replica: AtomicBool,
    /// Bumped whenever `replica_of` changes: a follower task of an older
    /// generation stops.
    follow_generation: AtomicU64,
    /// Bumped (under the `downstreams` lock) when this node rewinds a shard
    /// or installs a snapshot: downstream links started before it carry
    /// positions of the old log and end.
    swap_generation: AtomicU64,
    /// Each shard's durable LSN as the retention task last saw it.
    durable_hint: std::sync::Mutex<Vec<u64>>,
    /// The Sentinel port's last walk up the upstreams: when, from which
    /// upstream, the primary found and whether it answered.
    sentinel_walk: std::sync::Mutex<Option<(Instant, String, String, bool)>>,
    /// Backups under way (by number): per shard, the position of the
    /// snapshot each sent, from which it still reads records up to its cut.
    /// WAL at or above it is not released meanwhile.
    backup_holds:
        std::sync::Mutex<std::collections::BTreeMap<u64, std::collections::BTreeMap<u32, u64>>>,
    /// The replication cluster this node belongs to (`CLUSTER_FILE`): a
    /// primary's own, or the one a replica adopted from its upstream when it
    /// first joined; all zeros while a new replica has not joined yet.
    cluster: std::sync::Mutex<[u8; 16]>,
    /// The next link to the upstream asks for a snapshot re-sync.
    resync_requested: AtomicBool,
    /// Wakes writes waiting for replicas when acknowledgements arrive.
    ack_signal: commit::AckSignal,
    /// Whether commits are degraded (`degrade` policy), and counts.
    degraded: std::sync::Mutex<commit::Degraded>,
    /// Peers, votes and elections (automatic failover).
    failover: std::sync::Mutex<failover::Failover>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Whether this node follows another (and refuses writes).
    fn is_replica(&self) -> bool {
        self.replica.load(Ordering::Acquire)
    }

    /// The node this one follows, `HOST:PORT`; empty for a primary.
    fn replica_of(&self) -> String {
        self.replica_of
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Reads the cluster this node belongs to; a node that has none and
    /// does not follow another founds one with its own data directory's id.
    fn load_cluster(&self) {
        let path = self.config.data_dir.join(CLUSTER_FILE);
        let id = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| u128::from_str_radix(t.trim(), 16).ok())
            .map(u128::to_be_bytes);
        let id = match id {
            Some(id) => id,
            None if self.is_replica() => return,
            None => {
                let id = self.engine.cluster_id();
                self.set_cluster(id);
                id
            }
        };
        if let Ok(mut c) = self.cluster.lock() {
            *c = id;
        }
    }

    fn cluster(&self) -> [u8; 16] {
        self.cluster.lock().map(|c| *c).unwrap_or([0; 16])
    }

    /// Belongs to no cluster until the next join.
    fn leave_cluster(&self) {
        if let Ok(mut c) = self.cluster.lock() {
            *c = [0; 16];
        }
        let _ = std::fs::remove_file(self.config.data_dir.join(CLUSTER_FILE));
    }

    /// Joins cluster `id` and remembers it across restarts.
    fn set_cluster(&self, id: [u8; 16]) {
        if let Ok(mut c) = self.cluster.lock() {
            *c = id;
        }
        let path = self.config.data_dir.join(CLUSTER_FILE);
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, format!("{:032x}\n", u128::from_be_bytes(id)))
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| std::fs::File::open(&self.config.data_dir)?.sync_all());
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %path.display(), "could not record the cluster id");
        }
    }

    /// Re-syncs this replica from its upstream: the next link asks for it,
    /// and a follower stopped by a refusal (divergence) is started again.
    /// Each shard is rewound to where its log parts from the upstream's
    /// when the epoch histories tell, else replaced by the upstream's
    /// snapshot; what is replaced is kept aside (`quarantine-*/`).
    fn resync(self: &Arc<Self>) -> Result<String, &'static str> {
        let upstream = self.replica_of();
        if upstream.is_empty() {
            return Err("this node is not a replica: nothing to re-sync from");
        }
        self.resync_requested.store(true, Ordering::Release);
        let generation = self.set_upstream(&upstream);
        tracing::warn!(%upstream, "re-sync from the upstream requested (a rewind where the epoch histories locate the fork, else a snapshot)");
        glommio::spawn_local(replication::follow(
            self.clone(),
            upstream.clone(),
            generation,
        ))
        .detach();
        Ok(upstream)
    }

    /// Follows `upstream` from now on (empty: becomes a primary), and
    /// returns the generation a follower task for it runs under.
    fn set_upstream(&self, upstream: &str) -> u64 {
        if let Ok(mut r) = self.replica_of.lock() {
            *r = upstream.to_string();
        }
        if let Ok(mut u) = self.upstream.lock() {
            *u = replication::Upstream::default();
        }
        if let Ok(mut f) = self.failover.lock() {
            f.since = Some(Instant::now());
            f.stopped = None;
            f.rejoin.clear();
        }
        self.replica.store(!upstream.is_empty(), Ordering::Release);
        self.follow_generation.fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// Connects to another node at `HOST:PORT`, trying each address a name
/// resolves to in turn (`localhost` may give `::1` first to a node on
/// 127.0.0.1), each for at most [`CONNECT_EACH`]. A name is resolved on a
/// thread of its own: glommio's `connect` resolves on the executor, so a
/// slow DNS server would stall this core's clients and shards (and it
/// panics on a name that resolves to no address), and glommio's blocking
/// thread also keeps votes and renames WAL segments, which must not wait
/// behind a lookup.
pub(super) async fn connect(addr: &str) -> std::io::Result<glommio::net::TcpStream> {
    let resolved: Vec<SocketAddr> = match addr.parse::<SocketAddr>() {
        Ok(a) => vec![a],
        Err(_) => {
            let (tx, rx) = futures_channel::oneshot::channel();
            let name = addr.to_string();
            std::thread::Builder::new()
                .name("tidewal-resolve".into())
                .spawn(move || {
                    use std::net::ToSocketAddrs;
                    let _ = tx.send(name.to_socket_addrs().map(Iterator::collect));
                })?;
            rx.await
                .map_err(|_| std::io::Error::other("the lookup thread ended"))??
        }
    };
    let mut last = std::io::Error::other(format!("{addr} resolves to no address"));
    for a in resolved {
        match glommio::net::TcpStream::connect_timeout(a, CONNECT_EACH).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = std::io::Error::other(format!("{a}: {e}")),
        }
    }
    Err(last)
}

/// How long one address of a node is tried (an address that drops packets
/// would otherwise take the kernel's SYN timeout, minutes).
const CONNECT_EACH: Duration = Duration::from_secs(2);

/// In the data directory: the id of the replication cluster the node
/// belongs to, 32 hex digits.
const CLUSTER_FILE: &str = "cluster_id";

/// The lowest LSN of `shard` that replicas still need: the oldest durable
/// position among the replicas this node knows (connected or not, unless
/// refused), but no more than `retention.downstream_bytes_max` behind the
/// head, and the position of each backup under way's snapshot (unbounded:
/// a backup ends within a minute of its snapshots). WAL at or above it is
/// not released.
fn retention_hold(shared: &Shared, shard: u32) -> u64 {
    let backups = shared
        .backup_holds
        .lock()
        .ok()
        .and_then(|b| b.values().filter_map(|h| h.get(&shard).copied()).min())
        .unwrap_or(u64::MAX);
    downstream_hold(shared, shard).min(backups)
}

/// What the replicas this node knows hold back (see `retention_hold`).
fn downstream_hold(shared: &Shared, shard: u32) -> u64 {
    let head = shared.downstreams.lock().ok().and_then(|d| {
        d.values()
            .filter(|d| d.refused.is_none())
            .filter_map(|d| d.flushed.get(shard as usize).copied())
            .min()
    });
    let Some(oldest) = head else {
        return u64::MAX;
    };
    let durable = shared
        .durable_hint
        .lock()
        .ok()
        .and_then(|d| d.get(shard as usize).copied())
        .unwrap_or(0);
    oldest.max(durable.saturating_sub(shared.config.retention.downstream_bytes_max))
}

/// Snapshots each shard whose log grew `snapshot_every_bytes` since its
/// last snapshot, releasing WAL no replica still needs. Runs on the first
/// executor until the node stops.
async fn retain(shared: Arc<Shared>) {
    let every = shared.config.retention.snapshot_every_bytes;
    let mut last: Vec<u64> = Vec::new();
    while !shared.stopping() {
        glommio::timer::sleep(Duration::from_millis(500)).await;
        let Ok(stats) = shared.engine.stats().await else {
            return;
        };
        if let Ok(mut d) = shared.durable_hint.lock() {
            *d = stats.iter().map(|s| s.durable_lsn).collect();
        }
        if last.len() != stats.len() {
            last = stats.iter().map(|s| s.first_lsn).collect();
        }
        for s in &stats {
            let i = s.shard as usize;
            if s.durable_lsn.saturating_sub(last[i]) < every || s.failure.is_some() {
                continue;
            }
            let hold = retention_hold(&shared, s.shard);
            match shared.engine.snapshot_shard(s.shard, hold).await {
                Ok(lsn) => {
                    tracing::debug!(shard = s.shard, lsn, hold, "snapshot taken");
                    last[i] = lsn;
                }
                Err(e) => tracing::warn!(shard = s.shard, error = %e, "snapshot failed"),
            }
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: String, error: std::io::Error },
    #[error("the vote file: {0}")]
    Vote(String),
    #[error("{} holds an unfinished `tidewal restore` ({RESTORING} is there): restore again into an empty directory", .0.display())]
    Restoring(std::path::PathBuf),
}

/// In a data directory while `tidewal restore` fills it: a node does not
/// start on it (some shards may still be empty).
pub const RESTORING: &str = "RESTORING";

/// A running node.
pub struct Node {
    shared: Arc<Shared>,
    admin: Option<SocketAddr>,
    sentinel: Option<SocketAddr>,
}

impl Node {
    /// Opens the data directory and starts serving.
    pub fn start(config: NodeConfig) -> Result<Node, NodeError> {
        config.check()?;
        if config.data_dir.join(RESTORING).exists() {
            return Err(NodeError::Restoring(config.data_dir.clone()));
        }
        if config.spin_us > 0 && !config.engine.pin_executors {
            tracing::warn!(
                spin_us = config.spin_us,
                "executors are not pinned (engine.pin_executors = false): they will not poll before sleeping"
            );
        }
        if config.spin_us > 0 && config.engine.sync_mode == crate::io::SyncMode::Fdatasync {
            tracing::info!(
                spin_us = config.spin_us,
                "sync_mode = fdatasync: executors do not poll before sleeping (a polling executor keeps the fdatasync waiting)"
            );
        }
        // Claim the ports before anything else: if another process (another
        // node, a Redis) listens there, this fails instead of silently
        // sharing the port. Port 0 gets a free port here, held by the
        // claim until every listener is bound.
        let listen_claim = claim(&config.listen)?;
        let listen = listen_claim.addr;
        let admin_claim = if config.admin.is_empty() {
            None
        } else {
            Some(claim(&config.admin)?)
        };
        let admin = admin_claim.as_ref().map(|c| c.addr);
        let sentinel_claim = if config.sentinel.is_empty() {
            None
        } else {
            Some(claim(&config.sentinel)?)
        };
        let sentinel = sentinel_claim.as_ref().map(|c| c.addr);
        let engine = Engine::open(&config.data_dir, config.engine_options())?;
        let node_id = if config.node_id.is_empty() {
            if listen.ip().is_unspecified() && !config.peers.is_empty() {
                // A primary knows its peers' replicas by node id.
                tracing::warn!(%listen, "with failover peers, give every node its own --node-id: the default, the listen address, is the same on every host that listens on all addresses");
            }
            listen.to_string()
        } else {
            config.node_id.clone()
        };
        let shared = Arc::new(Shared {
            config,
            engine: engine.clone(),
            node_id,
            listen,
            started: Instant::now(),
            stopping: AtomicBool::new(false),
            counters: Counters::default(),
            next_client_id: AtomicU64::new(1),
            last_trim_ms: AtomicU64::new(0),
            trim_pending: AtomicBool::new(false),
            cursors: Default::default(),
            downstreams: Default::default(),
            upstream: Default::default(),
            replica_of: std::sync::Mutex::new(String::new()),
            replica: AtomicBool::new(false),
            follow_generation: AtomicU64::new(0),
            swap_generation: AtomicU64::new(0),
            resync_requested: AtomicBool::new(false),
            cluster: std::sync::Mutex::new([0; 16]),
            durable_hint: Default::default(),
            backup_holds: Default::default(),
            sentinel_walk: Default::default(),
            ack_signal: Default::default(),
            degraded: Default::default(),
            failover: Default::default(),
        });
        let generation = shared.set_upstream(&shared.config.replica_of);
        shared.load_cluster();
        if let Err(why) = failover::load_vote(&shared) {
            let _ = crate::engine::block_on(engine.close());
            return Err(NodeError::Vote(why));
        }
        failover::set_peers(&shared, &shared.config.peers);
        if let Err(e) = failover::check_start_as_primary(&shared) {
            let _ = crate::engine::block_on(engine.close());
            return Err(NodeError::Engine(e));
        }
        let (bound_tx, bound_rx) = mpsc::channel::<Result<(), NodeError>>();
        let bound_tx = std::sync::Mutex::new(bound_tx);
        let for_executors = shared.clone();
        engine.run_on_each(move |core| {
            let shared = for_executors.clone();
            let mut result = listen_on(core, shared.clone());
            if result.is_ok()
                && core == 0
                && let Some(admin) = admin
            {
                result = admin_on(admin, shared.clone());
            }
            if result.is_ok()
                && core == 0
                && let Some(sentinel) = sentinel
            {
                result = sentinel_on(sentinel, shared.clone());
            }
            if result.is_ok() && core == 0 && shared.config.retention.snapshot_every_bytes > 0 {
                glommio::spawn_local(retain(shared.clone())).detach();
            }
            if result.is_ok() && core == 0 {
                glommio::spawn_local(failover::elections(shared.clone())).detach();
            }
            if result.is_ok() && core == 0 && shared.is_replica() {
                let upstream = shared.replica_of();
                glommio::spawn_local(replication::follow(shared, upstream, generation)).detach();
            }
            let _ = bound_tx.lock().map(|tx| tx.send(result));
        })?;
        for _ in 0..engine.executor_count() {
            match bound_rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = crate::engine::block_on(engine.close());
                    return Err(e);
                }
                Err(_) => {
                    let _ = crate::engine::block_on(engine.close());
                    return Err(NodeError::Engine(EngineError::Closed));
                }
            }
        }
        // The listeners hold the ports now.
        drop((listen_claim, admin_claim, sentinel_claim));
        tracing::info!(
            %listen,
            admin = ?admin,
            node_id = %shared.node_id,
            executors = engine.executor_count(),
            shards = engine.shard_count(),
            "tidewal node serving"
        );
        Ok(Node {
            shared,
            admin,
            sentinel,
        })
    }

    /// The address clients connect to.
    pub fn listen_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    /// The admin HTTP address, when on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The Sentinel address, when on.
    pub fn sentinel_addr(&self) -> Option<SocketAddr> {
        self.sentinel
    }

    pub fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    /// Stops taking clients, lets each finish what it sent (up to the
    /// grace period), then makes everything durable and closes the engine.
    pub fn shutdown(self) -> Result<(), EngineError> {
        let shared = self.shared;
        shared.stopping.store(true, Ordering::SeqCst);
        let grace = Duration::from_millis(shared.config.limits.shutdown_grace_ms);
        let started = Instant::now();
        while shared.counters.connections.load(Ordering::SeqCst) > 0 && started.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = shared.counters.connections.load(Ordering::SeqCst);
        if left > 0 {
            tracing::warn!(
                clients = left,
                "grace period over; closing with clients still connected"
            );
        }
        let result = crate::engine::block_on(shared.engine.close());
        tracing::info!(ok = result.is_ok(), "tidewal node stopped");
        result
    }
}

/// A port the node has claimed: `addr` has the port chosen for port 0, and
/// `socket`, bound there and not listening, keeps it out of other
/// processes' port-0 binds until the node's listeners are bound.
struct Claim {
    addr: SocketAddr,
    #[allow(dead_code, reason = "held for its binding, never used")]
    socket: socket2::Socket,
}

/// Makes sure nobody else listens on `addr` and claims it.
///
/// The claim must be held until the listeners are bound: a port 0 chosen
/// here and let go is free again, and another node's port-0 bind can be
/// given it; both sets of listeners then bind it (`SO_REUSEPORT`), and the
/// kernel spreads one port's connections over two processes.
///
/// glommio's listeners set `SO_REUSEPORT`, so a second process binding the
/// same port would silently share it: a connection to the address tells
/// whether someone listens. The bind that follows sets `SO_REUSEPORT` too,
/// like the listeners: a plain bind would fail for as long as the previous
/// run's connections linger in TIME_WAIT (up to a minute), so a node could
/// not restart on its own port.
fn claim(addr: &str) -> Result<Claim, NodeError> {
    use std::net::ToSocketAddrs;
    let fail = |error| NodeError::Listen {
        addr: addr.to_string(),
        error,
    };
    let resolved = addr
        .to_socket_addrs()
        .map_err(fail)?
        .next()
        .ok_or_else(|| fail(std::io::Error::other("resolves to no address")))?;
    if resolved.port() != 0 {
        let mut probe = resolved;
        if probe.ip().is_unspecified() {
            probe.set_ip(match probe {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        // A listener of a process that just died can answer for a moment:
        // io_uring tears a ring down after the process is gone, and the
        // ring's pending accept keeps the socket open until then. Only a
        // listener still there after a few seconds is someone else's.
        let started = Instant::now();
        while std::net::TcpStream::connect_timeout(&probe, Duration::from_millis(500)).is_ok() {
            if started.elapsed() > Duration::from_secs(5) {
                return Err(fail(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process listens there",
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(resolved),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    socket.set_reuse_port(true).map_err(fail)?;
    socket.bind(&resolved.into()).map_err(fail)?;
    let addr = socket
        .local_addr()
        .map_err(fail)?
        .as_socket()
        .ok_or_else(|| fail(std::io::Error::other("not an IP address")))?;
    Ok(Claim { addr, socket })
}

/// Starts accepting clients on this executor.
fn listen_on(core: u32, shared: Arc<Shared>) -> Result<(), NodeError> {
    let addr = shared.listen;
    let listener = glommio::net::TcpListener::bind(addr).map_err(|e| NodeError::Listen {
        addr: addr.to_string(),
        error: std::io::Error::other(e.to_string()),
    })?;
    glommio::spawn_local(async move {
        accept_loop(listener, shared, core, Port::Clients).await;
    })
    .detach();
    Ok(())
}

fn admin_on(addr: SocketAddr, shared: Arc<Shared>) -> Result<(), NodeError> {
    let listener = glommio::net::TcpListener::bind(addr).map_err(|e| NodeError::Listen {
        addr: addr.to_string(),
        error: std::io::Error::other(e.to_string()),
    })?;
    glommio::spawn_local(async move {
        accept_loop(listener, shared, 0, Port::Admin).await;
    })
    .detach();
    Ok(())
}

/// Starts answering as a Redis Sentinel (`sentinel.rs`) on the first
/// executor.
fn sentinel_on(addr: SocketAddr, shared: Arc<Shared>) -> Result<(), NodeError> {
    let listener = glommio::net::TcpListener::bind(addr).map_err(|e| NodeError::Listen {
        addr: addr.to_string(),
        error: std::io::Error::other(e.to_string()),
    })?;
    glommio::spawn_local(async move {
        accept_loop(listener, shared, 0, Port::Sentinel).await;
    })
    .detach();
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    Clients,
    Admin,
    Sentinel,
}

/// Accepts until the node stops. Clients count against the connection
/// limit; admin requests do not.
async fn accept_loop(
    listener: glommio::net::TcpListener,
    shared: Arc<Shared>,
    core: u32,
    port: Port,
) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            while !shared.stopping() {
                glommio::timer::sleep(Duration::from_millis(50)).await;
                if shared.trim_pending.load(Ordering::Relaxed) {
                    trim_memory(&shared);
                }
            }
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                // Out of descriptors, say: wait a little and go on.
                tracing::warn!(core, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if port == Port::Admin {
            glommio::spawn_local(admin::serve(stream, shared.clone())).detach();
            continue;
        }
        if port == Port::Sentinel {
            // Not counted against the client limit: a reconnect storm after
            // a failover must not lock out the clients' way to the primary.
            let shared = shared.clone();
            glommio::spawn_local(conn::serve(stream, shared, true)).detach();
            continue;
        }
        let c = &shared.counters;
        c.connections_total.fetch_add(1, Ordering::Relaxed);
        let now = c.connections.fetch_add(1, Ordering::SeqCst) + 1;
        if now > shared.config.limits.connections_max {
            c.connections.fetch_sub(1, Ordering::SeqCst);
            c.rejected.fetch_add(1, Ordering::Relaxed);
            glommio::spawn_local(async move {
                use futures_lite::AsyncWriteExt;
                let mut stream = stream;
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                let _ = stream.close().await;
            })
            .detach();
            continue;
        }
        let shared = shared.clone();
        glommio::spawn_local(async move {
            let guard = ConnectionGuard(shared.clone());
            conn::serve(stream, shared, false).await;
            drop(guard);
        })
        .detach();
    }
}

/// Counts a client out however its task ends.
struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let left = self.0.counters.connections.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 {
            trim_memory(&self.0);
        }
    }
}

/// When the last client left, hands the memory their buffers used back to
/// the system: glibc keeps freed memory in per-thread arenas, so a burst of
/// connections would otherwise raise the node's footprint for good. At
/// most once a second (a trim walks the free lists); a trim that falls
/// within the second is put off to its end (the accept loop runs it), not
/// dropped, or the last of several bursts would keep its memory.
fn trim_memory(shared: &Shared) {
    let now = shared.started.elapsed().as_millis() as u64;
    let last = shared.last_trim_ms.load(Ordering::Relaxed);
    if now.saturating_sub(last) < 1000 {
        shared.trim_pending.store(true, Ordering::Relaxed);
        return;
    }
    if shared
        .last_trim_ms
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        shared.trim_pending.store(false, Ordering::Relaxed);
        // SAFETY: malloc_trim only releases memory that is free.
        unsafe { libc::malloc_trim(0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> socket2::Socket {
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap()
    }

    #[test]
    fn a_claimed_port_is_kept_from_others_and_open_to_the_nodes_listeners() {
        let claimed = claim("127.0.0.1:0").expect("claim a free port");
        assert_ne!(claimed.addr.port(), 0);
        // Someone else's bind is refused for as long as the claim is held
        // (a port-0 bind is never given it either).
        let other = socket();
        let refused = other
            .bind(&claimed.addr.into())
            .expect_err("the port is held");
        assert_eq!(refused.kind(), std::io::ErrorKind::AddrInUse);
        // The node's own listeners bind it as glommio does, SO_REUSEPORT
        // alone, and keep it when the claim is let go.
        let listener = socket();
        listener.set_reuse_port(true).unwrap();
        listener
            .bind(&claimed.addr.into())
            .expect("a listener binds the claimed port");
        listener.listen(16).unwrap();
        let addr = claimed.addr;
        drop(claimed);
        std::net::TcpStream::connect(addr).expect("the listener answers");
        let refused = socket()
            .bind(&addr.into())
            .expect_err("the listener holds it");
        assert_eq!(refused.kind(), std::io::ErrorKind::AddrInUse);
    }
}
