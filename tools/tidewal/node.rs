//! `tidewal node`: run a server until SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tidewal::server::{Commit, Node, NodeConfig, TimeoutPolicy};

/// Flags override the config file, which overrides the defaults.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// A TOML file with the same settings (see `src/server/config.rs`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (created if missing; locked while the node runs).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client address, RESP2 (default 127.0.0.1:6379; port 0 picks one).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Admin HTTP address (default 127.0.0.1:9121; "" turns it off).
    #[arg(long, value_name = "HOST:PORT")]
    admin: Option<String>,
    /// This node's name in status pages (default: the listen address).
    #[arg(long)]
    node_id: Option<String>,
    /// Shards, fixed when the data directory is created (default: one per
    /// core).
    #[arg(long, value_name = "N")]
    shards: Option<u32>,
    /// Level every write waits for before it is acknowledged: `memory`,
    /// `local` (durable on this disk), `replicated(k)` (and on k replicas),
    /// `all` (and on every replica), `applied(k)`.
    #[arg(long, value_name = "LEVEL")]
    commit_level: Option<Commit>,
    /// Milliseconds a write waits for the replicas its level needs.
    #[arg(long, value_name = "MS")]
    commit_timeout_ms: Option<u64>,
    /// What a write gets when its replicas do not answer in time: `fail`
    /// (an error naming the level reached) or `degrade` (success at the
    /// level reached, reported as degraded).
    #[arg(long, value_name = "POLICY", value_parser = parse_policy)]
    commit_policy: Option<TimeoutPolicy>,
    /// Follow the node at HOST:PORT as a read-only replica (asynchronous
    /// WAL streaming; writes get -READONLY naming it).
    #[arg(long, value_name = "HOST:PORT")]
    replica_of: Option<String>,
    /// As a replica, serve no reads (warm standby): replicate, and wait to
    /// be promoted (`REPLICAOF NO ONE`).
    #[arg(long)]
    warm_standby: bool,
    /// The other data nodes' client addresses, comma-separated: turns on
    /// automatic failover (elections when the primary goes silent).
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// Milliseconds of silence from the primary before a replica with
    /// peers stands in an election (default 2000; at least 1000).
    #[arg(long, value_name = "MS")]
    election_timeout_ms: Option<u64>,
    /// Never stand in an election (still vote, and follow whoever wins).
    #[arg(long)]
    no_failover_candidate: bool,
    /// Shell command run each time this node becomes the primary (elected
    /// or `REPLICAOF NO ONE`), e.g. to update DNS; gets TIDEWAL_LISTEN,
    /// TIDEWAL_NODE_ID, TIDEWAL_EPOCH, TIDEWAL_REASON.
    #[arg(long, value_name = "CMD")]
    on_promote: Option<String>,
    /// Also answer as a Redis Sentinel here (its own port, e.g. 26379):
    /// Sentinel clients given every node's find the primary, also after a
    /// failover.
    #[arg(long, value_name = "HOST:PORT")]
    sentinel: Option<String>,
    /// The cluster's name for Sentinel clients (default "tidewal").
    #[arg(long, value_name = "NAME")]
    sentinel_name: Option<String>,
    /// Executors (cores) to run on (default: every allowed core).
    #[arg(long, value_name = "N")]
    executors: Option<u32>,
    /// Microseconds an idle executor polls before it sleeps (default 200;
    /// 0 sleeps at once): CPU for latency under light load.
    #[arg(long, value_name = "US")]
    spin_us: Option<u64>,
    /// Run even where O_DIRECT is not in effect (tmpfs): not durable.
    #[arg(long)]
    allow_buffered_io: bool,
    /// Print the admin and client addresses on stdout once serving (for
    /// scripts that start a node on port 0).
    #[arg(long)]
    print_addresses: bool,
}

fn parse_policy(s: &str) -> Result<TimeoutPolicy, String> {
    match s {
        "fail" => Ok(TimeoutPolicy::Fail),
        "degrade" => Ok(TimeoutPolicy::Degrade),
        other => Err(format!(
            "unknown commit policy {other:?}: `fail` or `degrade`"
        )),
    }
}

pub fn config(args: &NodeArgs) -> anyhow::Result<NodeConfig> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::from_toml_file(path)?,
        None => NodeConfig::default(),
    };
    if let Some(v) = &args.data_dir {
        config.data_dir = v.clone();
    }
    if let Some(v) = &args.listen {
        config.listen = v.clone();
    }
    if let Some(v) = &args.admin {
        config.admin = v.clone();
    }
    if let Some(v) = &args.node_id {
        config.node_id = v.clone();
    }
    if let Some(v) = args.shards {
        config.shards = v;
    }
    if let Some(v) = args.commit_level {
        config.commit_level = v;
    }
    if let Some(v) = args.commit_timeout_ms {
        config.commit_timeout_ms = v;
    }
    if let Some(v) = args.commit_policy {
        config.commit_policy = v;
    }
    if let Some(v) = &args.replica_of {
        config.replica_of = v.clone();
    }
    if args.warm_standby {
        config.warm_standby = true;
    }
    if let Some(v) = &args.peers {
        config.peers = v.clone();
    }
    if let Some(v) = args.election_timeout_ms {
        config.election_timeout_ms = v;
    }
    if args.no_failover_candidate {
        config.failover_candidate = false;
    }
    if let Some(v) = &args.on_promote {
        config.on_promote = v.clone();
    }
    if let Some(v) = &args.sentinel {
        config.sentinel = v.clone();
    }
    if let Some(v) = &args.sentinel_name {
        config.sentinel_name = v.clone();
    }
    if let Some(v) = args.executors {
        config.engine.executor_count = v;
    }
    if let Some(v) = args.spin_us {
        config.spin_us = v;
    }
    if args.allow_buffered_io {
        config.engine.allow_buffered_io = true;
    }
    Ok(config)
}

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    let config = config(&args)?;
    // A panic on an executor would leave a process that holds its ports and
    // data directory but serves nothing. Fail stop instead: log it and
    // abort, so a supervisor restarts the node and recovery runs.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!(%info, "a tidewal thread panicked; aborting the node");
        std::process::abort();
    }));
    // Signals are taken before any thread starts, so every thread inherits
    // the handler's mask rather than dying on SIGTERM.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    let node = Node::start(config)?;
    if args.print_addresses {
        println!("listen {}", node.listen_addr());
        if let Some(admin) = node.admin_addr() {
            println!("admin {admin}");
        }
        if let Some(sentinel) = node.sentinel_addr() {
            println!("sentinel {sentinel}");
        }
    }
    let signal = signals.forever().next();
    tracing::info!(?signal, "shutting down");
    node.shutdown().context("closing the engine")?;
    Ok(())
}
