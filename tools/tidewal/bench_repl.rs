//! `tidewal bench replication`: durable commits/s and latency of SET at 1,
//! 8 and 64 clients for the commit levels `local`, `replicated(1)` (with
//! one and with two replicas) and `all`; Redis with a replica and `SET` +
//! `WAIT 1 0` (where `redis-server` is installed) and PostgreSQL with a
//! synchronous standby driven by pgbench (where it is installed) in the
//! same run;
//! replication lag under the load; and catch-up speed of an empty replica
//! against the disk's sequential write ceiling. Every figure is the median
//! of `--repeat` runs; runs of the systems alternate, so drift on a shared
//! machine hits all of them.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::cluster::{
    Client, NodeChild, Reply, latency_histogram, scratch_dir, wait_converged, wait_status,
};

#[derive(Args, Debug)]
pub struct BenchReplArgs {
    /// Client counts to run.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    clients: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Megabytes written before an empty replica joins, for catch-up.
    #[arg(long, default_value_t = 64)]
    catch_up_mb: u64,
    /// Executors per tidewal node.
    #[arg(long, default_value_t = 1)]
    executors: u32,
    /// Microseconds an idle executor of each node polls before it sleeps
    /// (`tidewal node --spin-us`). 0 by default: the nodes share this
    /// machine's cores with each other and the clients, and a polling node
    /// takes CPU they need (on the 2-core VM, `replicated(1)` at 64 clients
    /// went from 1.03-1.22x Redis at 0 to 0.87-0.94x at 200).
    #[arg(long, value_name = "US", default_value_t = 0)]
    spin_us: u64,
    /// Skip Redis even where it is installed.
    #[arg(long)]
    no_redis: bool,
    /// Skip PostgreSQL even where it is installed.
    #[arg(long)]
    no_postgres: bool,
}

/// One run: commits/s, p50 and p99 in ms, and the replica lag seen.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    per_s: f64,
    p50: f64,
    p99: f64,
    lag_max_bytes: u64,
}

/// Runs `clients` connections to `addr` for `seconds`; each sends `setup`
/// once and then `SET key value` (and `then`, when given) in a loop.
/// `lag` is sampled every 100 ms during the run.
fn load(
    addr: SocketAddr,
    clients: usize,
    seconds: f64,
    value_bytes: usize,
    setup: &[&[u8]],
    then: Option<&'static [&'static [u8]]>,
    lag: &dyn Fn() -> u64,
) -> anyhow::Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let merged = Arc::new(Mutex::new(latency_histogram()));
    let setup: Vec<Vec<u8>> = setup.iter().map(|a| a.to_vec()).collect();
    let mut workers = Vec::new();
    let ready = Arc::new(std::sync::Barrier::new(clients + 1));
    for id in 0..clients {
        let (stop, merged, ready, setup) =
            (stop.clone(), merged.clone(), ready.clone(), setup.clone());
        workers.push(std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut c = Client::connect(addr)?;
            if !setup.is_empty() {
                let args: Vec<&[u8]> = setup.iter().map(|a| a.as_slice()).collect();
                c.ok(&args)?;
            }
            let value = vec![b'v'; value_bytes];
            let mut h = latency_histogram();
            let mut n = 0u64;
            ready.wait();
            while !stop.load(Ordering::Relaxed) {
                let key = format!("bench:{id}:{}", n % 100_000);
                let t = Instant::now();
                if let Reply::Error(e) = c.call(&[b"SET", key.as_bytes(), &value])? {
                    bail!("SET: {e}");
                }
                if let Some(then) = then {
                    match c.call(then)? {
                        Reply::Error(e) => bail!("{e}"),
                        Reply::Int(0) => bail!("WAIT returned 0 replicas"),
                        _ => {}
                    }
                }
                h.saturating_record(t.elapsed().as_micros().max(1) as u64);
                n += 1;
            }
            merged.lock().expect("not poisoned").add(&h)?;
            Ok(n)
        }));
    }
    ready.wait();
    let started = Instant::now();
    let mut lag_max = 0;
    while started.elapsed().as_secs_f64() < seconds {
        std::thread::sleep(Duration::from_millis(100));
        lag_max = lag_max.max(lag());
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        total += w
            .join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let h = merged.lock().expect("not poisoned");
    Ok(Run {
        per_s: total as f64 / elapsed,
        p50: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99: h.value_at_quantile(0.99) as f64 / 1000.0,
        lag_max_bytes: lag_max,
    })
}

fn median(runs: &[Run]) -> Run {
    let pick = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Run {
        per_s: pick(|r| r.per_s),
        p50: pick(|r| r.p50),
        p99: pick(|r| r.p99),
        lag_max_bytes: pick(|r| r.lag_max_bytes as f64) as u64,
    }
}

/// A Redis primary and replica, `appendfsync always` on both.
struct RedisPair {
    children: Vec<Child>,
    primary: SocketAddr,
}

impl RedisPair {
    fn start(dir: &Path) -> anyhow::Result<RedisPair> {
        let port = |p: u16| -> anyhow::Result<u16> {
            let l = std::net::TcpListener::bind(("127.0.0.1", p))?;
            Ok(l.local_addr()?.port())
        };
        let (pp, rp) = (port(0)?, port(0)?);
        let mut children = Vec::new();
        for (name, p, extra) in [
            ("redis-primary", pp, vec![]),
            (
                "redis-replica",
                rp,
                vec![
                    "--replicaof".to_string(),
                    "127.0.0.1".into(),
                    pp.to_string(),
                ],
            ),
        ] {
            let d = dir.join(name);
            std::fs::create_dir_all(&d)?;
            let mut cmd = Command::new("redis-server");
            cmd.args([
                "--port",
                &p.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(&d)
            .arg("--logfile")
            .arg(d.join("redis.log"));
            cmd.args(&extra);
            children.push(
                crate::cluster::stop_with_parent(&mut cmd)
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting redis-server")?,
            );
        }
        let primary: SocketAddr = format!("127.0.0.1:{pp}").parse()?;
        let pair = RedisPair { children, primary };
        // Wait for the replica link.
        let started = Instant::now();
        loop {
            if let Ok(mut c) = Client::connect(primary)
                && let Ok(Reply::Bulk(Some(info))) = c.call(&[b"INFO", b"replication"])
                && String::from_utf8_lossy(&info).contains("connected_slaves:1")
                && let Ok(Reply::Int(1)) = {
                    let _ = c.call(&[b"SET", b"probe", b"1"]);
                    c.call(&[b"WAIT", b"1", b"1000"])
                }
            {
                return Ok(pair);
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the Redis replica did not attach");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisPair {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A PostgreSQL primary with a synchronous standby
/// (`synchronous_commit = on`, `synchronous_standby_names = '*'`), driven
/// by pgbench with an upsert of the same key and value sizes.
struct PgPair {
    bin: std::path::PathBuf,
    dir: std::path::PathBuf,
    port: u16,
    script: std::path::PathBuf,
}

impl PgPair {
    fn find() -> Option<std::path::PathBuf> {
        let from_config = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .map(|o| std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        from_config
            .into_iter()
            .chain(
                which("initdb")
                    .and_then(|p| p.canonicalize().ok()?.parent().map(Path::to_path_buf)),
            )
            .find(|b| b.join("initdb").is_file() && b.join("pgbench").is_file())
            .or_else(|| {
                which("pgbench")
                    .filter(|_| which("initdb").is_some())
                    .and_then(|p| p.parent().map(Path::to_path_buf))
            })
    }

    /// Runs `args` as the `postgres` user when this process is root
    /// (PostgreSQL refuses to run as root).
    fn command(&self, tool: &str) -> Command {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            c
        } else {
            Command::new(self.bin.join(tool))
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(tool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!("{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// `psql` against the primary, with `flag` (`-c`, `-Atc`) and `sql`.
    fn psql(&self, flag: &str, sql: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        self.run(
            "psql",
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", flag, sql],
        )
    }

    fn start(bin: std::path::PathBuf, dir: &Path) -> anyhow::Result<PgPair> {
        std::fs::create_dir_all(dir)?;
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir)
                .status()?;
            if !status.success() {
                bail!("chown postgres {}", dir.display());
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let pair = PgPair {
            bin,
            dir: dir.to_path_buf(),
            port,
            script: dir.join("set.sql"),
        };
        let d = |name: &str| dir.join(name).display().to_string();
        pair.run(
            "initdb",
            &["-D", &d("primary"), "-A", "trust", "-U", "postgres"],
        )?;
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = on\nsynchronous_commit = on\nsynchronous_standby_names = '*'\nwal_level = replica\nmax_connections = 200\nshared_buffers = 256MB\n",
            dir.display()
        );
        append(&dir.join("primary/postgresql.conf"), &conf)?;
        append(
            &dir.join("primary/pg_hba.conf"),
            "host replication all 127.0.0.1/32 trust\n",
        )?;
        pair.run(
            "pg_ctl",
            &["-D", &d("primary"), "-l", &d("primary.log"), "-w", "start"],
        )?;
        let p = port.to_string();
        pair.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &p,
                "-U",
                "postgres",
                "-D",
                &d("standby"),
                "-R",
                "-X",
                "stream",
            ],
        )?;
        let standby_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        append(
            &dir.join("standby/postgresql.conf"),
            &format!("port = {standby_port}\n"),
        )?;
        pair.run(
            "pg_ctl",
            &["-D", &d("standby"), "-l", &d("standby.log"), "-w", "start"],
        )?;
        pair.psql("-c", "create table kv (k int primary key, v text)")?;
        std::fs::write(
            &pair.script,
            "\\set k random(1, 100000)\nINSERT INTO kv VALUES (:k, repeat('v', 100)) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v;\n",
        )?;
        let _ = Command::new("chown")
            .arg("postgres")
            .arg(&pair.script)
            .status();
        let state = pair.psql("-Atc", "select sync_state from pg_stat_replication")?;
        if state.trim() != "sync" {
            bail!("the PostgreSQL standby is not synchronous: {state:?}");
        }
        Ok(pair)
    }

    /// pgbench for `seconds` at `clients`: tps and the average latency.
    fn bench(&self, clients: usize, seconds: f64) -> anyhow::Result<Run> {
        let (c, j, t) = (
            clients.to_string(),
            clients.min(2).to_string(),
            (seconds.ceil() as u64).max(1).to_string(),
        );
        let p = self.port.to_string();
        let script = self.script.display().to_string();
        let out = self.run(
            "pgbench",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &p,
                "-U",
                "postgres",
                "-n",
                "-M",
                "prepared",
                "-c",
                &c,
                "-j",
                &j,
                "-T",
                &t,
                "-f",
                &script,
                "postgres",
            ],
        )?;
        let field = |prefix: &str| -> Option<f64> {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        };
        let tps = field("tps = ").context("pgbench printed no tps")?;
        let avg = field("latency average = ").unwrap_or(0.0);
        Ok(Run {
            per_s: tps,
            p50: avg,
            p99: f64::NAN,
            lag_max_bytes: 0,
        })
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        for name in ["standby", "primary"] {
            let d = self.dir.join(name).display().to_string();
            let _ = self.run("pg_ctl", &["-D", &d, "-m", "immediate", "stop"]);
        }
    }
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The first command of each connection (none: empty).
type Setup = &'static [&'static [u8]];

/// A system under test: its name, address, setup command, the command to
/// send after each `SET` (Redis's `WAIT`), and the node whose replica lag
/// is sampled.
type System<'a> = (
    &'static str,
    SocketAddr,
    Setup,
    Option<Setup>,
    &'a NodeChild,
);

/// A tidewal primary whose connections write at the level `setup` sets.
fn tidewal_system<'a>(name: &'static str, node: &'a NodeChild, setup: Setup) -> System<'a> {
    (name, node.listen, setup, None, node)
}

const LOCAL: Setup = &[b"CLIENT", b"COMMIT-LEVEL", b"local"];
const REPLICATED_1: Setup = &[b"CLIENT", b"COMMIT-LEVEL", b"replicated(1)"];
const ALL: Setup = &[b"CLIENT", b"COMMIT-LEVEL", b"all"];

/// Lag in bytes of the first replica of `node`.
fn lag_of(node: &NodeChild) -> u64 {
    node.status()
        .ok()
        .and_then(|s| s["replicas"][0]["lag_bytes"].as_u64())
        .unwrap_or(0)
}

pub fn run(args: BenchReplArgs) -> anyhow::Result<()> {
    let scratch = scratch_dir("tidewal-bench-repl-")?;
    let node_args = |more: &[&str]| -> Vec<String> {
        let mut v = vec![
            "--shards".to_string(),
            "2".into(),
            "--executors".into(),
            args.executors.to_string(),
            "--commit-timeout-ms".into(),
            "10000".into(),
        ];
        v.extend(["--spin-us".to_string(), args.spin_us.to_string()]);
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    println!(
        "tidewal bench replication: SET of {}-byte values, {} s per run, median of {}; nodes on loopback under {}",
        args.value_bytes,
        args.seconds,
        args.repeat,
        scratch.path().display()
    );
    // One primary with one replica (local, replicated(1)), one with two
    // (replicated(1), all).
    let p1 = NodeChild::start("p1", &scratch.path().join("p1"), &node_args(&[]))?;
    let r1 = NodeChild::start(
        "p1-r1",
        &scratch.path().join("p1-r1"),
        &node_args(&["--replica-of", &p1.listen.to_string()]),
    )?;
    let p2 = NodeChild::start("p2", &scratch.path().join("p2"), &node_args(&[]))?;
    let r2a = NodeChild::start(
        "p2-r1",
        &scratch.path().join("p2-r1"),
        &node_args(&["--replica-of", &p2.listen.to_string()]),
    )?;
    let r2b = NodeChild::start(
        "p2-r2",
        &scratch.path().join("p2-r2"),
        &node_args(&["--replica-of", &p2.listen.to_string()]),
    )?;
    let two = |s: &serde_json::Value| {
        s["replicas"]
            .as_array()
            .is_some_and(|r| r.iter().filter(|x| x["status"] == "streaming").count() == 2)
    };
    wait_status(&p1, "a streaming replica", Duration::from_secs(30), |s| {
        s["replicas"][0]["status"] == "streaming"
    })?;
    wait_status(&p2, "two streaming replicas", Duration::from_secs(30), two)?;
    let redis = if args.no_redis || which("redis-server").is_none() {
        println!("(redis-server not installed: no Redis figures)");
        None
    } else {
        Some(RedisPair::start(&scratch.path().join("redis"))?)
    };

    let postgres = match (args.no_postgres, PgPair::find()) {
        (false, Some(bin)) => Some(PgPair::start(bin, &scratch.path().join("postgres"))?),
        _ => {
            println!("(PostgreSQL not installed or skipped: no PostgreSQL figures)");
            None
        }
    };
    let systems: Vec<System<'_>> = {
        let mut v = vec![
            tidewal_system("tidewal local (1 replica, async)", &p1, LOCAL),
            tidewal_system("tidewal replicated(1), 1 replica", &p1, REPLICATED_1),
            tidewal_system("tidewal replicated(1), 2 replicas", &p2, REPLICATED_1),
            tidewal_system("tidewal all, 2 replicas", &p2, ALL),
        ];
        if let Some(r) = &redis {
            v.push((
                "Redis appendfsync always + WAIT 1 0",
                r.primary,
                &[],
                Some(&[b"WAIT", b"1", b"0"]),
                &p1,
            ));
        }
        v
    };
    let mut table: Vec<Vec<Run>> = vec![Vec::new(); systems.len()];
    let mut pg_table: Vec<Run> = Vec::new();
    for &clients in &args.clients {
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); systems.len()];
        let mut pg_runs = Vec::new();
        for _ in 0..args.repeat {
            if let Some(pg) = &postgres {
                pg_runs.push(pg.bench(clients, args.seconds)?);
            }
            for (i, (name, addr, setup, then, node)) in systems.iter().enumerate() {
                let is_redis = name.starts_with("Redis");
                let lag = || if is_redis { 0 } else { lag_of(node) };
                let run = load(
                    *addr,
                    clients,
                    args.seconds,
                    args.value_bytes,
                    setup,
                    *then,
                    &lag,
                )
                .with_context(|| format!("{name} at {clients} clients"))?;
                runs[i].push(run);
            }
        }
        for (i, r) in runs.iter().enumerate() {
            table[i].push(median(r));
        }
        if !pg_runs.is_empty() {
            pg_table.push(median(&pg_runs));
        }
    }
    println!();
    print!("{:<38}", "commits/s (p50 / p99 ms)");
    for c in &args.clients {
        print!("{:>28}", format!("{c} client(s)"));
    }
    println!();
    for (i, (name, ..)) in systems.iter().enumerate() {
        print!("{name:<38}");
        for r in &table[i] {
            print!(
                "{:>28}",
                format!("{:.0} ({:.2} / {:.2})", r.per_s, r.p50, r.p99)
            );
        }
        println!();
    }
    if !pg_table.is_empty() {
        print!("{:<38}", "PostgreSQL sync standby (avg ms)");
        for r in &pg_table {
            print!("{:>28}", format!("{:.0} (avg {:.2})", r.per_s, r.p50));
        }
        println!();
    }
    let ratio = |a: usize, b: usize| -> Vec<String> {
        table[a]
            .iter()
            .zip(&table[b])
            .map(|(x, y)| format!("{:.2}", x.per_s / y.per_s))
            .collect()
    };
    println!();
    println!(
        "replicated(1)/local, 1 replica:        {}",
        ratio(1, 0).join("  ")
    );
    println!(
        "replicated(1)/local, 2 replicas:       {}",
        ratio(2, 0).join("  ")
    );
    if !pg_table.is_empty() {
        let r: Vec<String> = table[1]
            .iter()
            .zip(&pg_table)
            .map(|(x, y)| format!("{:.2}", x.per_s / y.per_s))
            .collect();
        println!("replicated(1)/PostgreSQL sync standby: {}", r.join("  "));
    }
    drop(postgres);
    if redis.is_some() {
        println!(
            "replicated(1)/Redis WAIT 1 0:          {}",
            ratio(1, 4).join("  ")
        );
    }
    println!(
        "replica lag during the runs, max bytes (median of runs): local {}, replicated(1) {}",
        table[0]
            .iter()
            .map(|r| r.lag_max_bytes.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        table[1]
            .iter()
            .map(|r| r.lag_max_bytes.to_string())
            .collect::<Vec<_>>()
            .join("/"),
    );
    drop(redis);
    r2b.stop();
    r2a.stop();
    p2.stop();
    r1.stop();

    // Catch-up: an empty replica joins a primary holding catch_up_mb.
    let mut c = Client::connect(p1.listen)?;
    c.ok(&[b"CLIENT", b"COMMIT-LEVEL", b"memory"])?;
    let value = vec![b'c'; 4000];
    let target = args.catch_up_mb << 20;
    let mut written = 0u64;
    let mut i = 0u64;
    while written < target {
        let key = format!("catchup:{i}");
        c.ok(&[b"SET", key.as_bytes(), &value])?;
        written += value.len() as u64 + key.len() as u64;
        i += 1;
    }
    c.ok(&[b"CLIENT", b"COMMIT-LEVEL", b"local"])?;
    c.ok(&[b"SET", b"catchup:last", b"1"])?;
    let log_bytes: u64 = p1.positions()?.iter().map(|(lsn, _)| lsn).sum();
    let t = Instant::now();
    let fresh = NodeChild::start(
        "catch-up",
        &scratch.path().join("catch-up"),
        &node_args(&["--replica-of", &p1.listen.to_string()]),
    )?;
    let took = wait_converged(&p1, &[&fresh], Duration::from_secs(600))?;
    let total = t.elapsed();
    let mb_s = log_bytes as f64 / 1e6 / total.as_secs_f64();
    let ceiling = crate::bench_wal::sequential_ceiling(&scratch.path().join("ceiling"))?;
    println!(
        "catch-up: an empty replica copied {:.1} MB of log in {:.2} s (node start included; {:.2} s after start) = {:.0} MB/s; disk sequential write ceiling {:.0} MB/s ({:.0}%)",
        log_bytes as f64 / 1e6,
        total.as_secs_f64(),
        took.as_secs_f64(),
        mb_s,
        ceiling,
        mb_s / ceiling * 100.0
    );
    fresh.stop();
    p1.stop();
    Ok(())
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
