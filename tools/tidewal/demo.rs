//! `tidewal demo`: the main job. A primary, a replica and a cascaded
//! replica on loopback, in temporary directories; a mixed load at the
//! `replicated(1)` level with reads from the replicas; commits/s, latency
//! percentiles, per-replica lag and the status JSON at the end, and with
//! `--plot FILE.svg` the latency and lag over time. Then, unless
//! `--no-failover`, the primary is killed under `replicated(1)` writes and
//! the two others elect a new one, which must hold every acknowledged
//! write.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cluster::{
    Client, NodeChild, Reply, latency_histogram, scratch_dir, wait_converged, wait_status,
};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Client connections driving the load.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Share of operations that are reads from the replicas (0 to 1).
    #[arg(long, default_value_t = 0.2)]
    read_ratio: f64,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Level the primary's writes wait for.
    #[arg(long, default_value = "replicated(1)")]
    commit_level: String,
    /// Shards per node.
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Write an SVG of write latency and replica lag over time.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Run where O_DIRECT is not in effect (tmpfs): not durable.
    #[arg(long)]
    allow_buffered_io: bool,
    /// Skip the failover at the end (the primary killed under
    /// `replicated(1)` writes, a new one elected, every acknowledged write
    /// checked on it).
    #[arg(long)]
    no_failover: bool,
}

/// The nodes' election timeout: the lowest a node accepts.
const ELECTION_TIMEOUT_MS: &str = "1000";

/// Writers of the failover phase, and how long they write before the kill.
const FAILOVER_WRITERS: usize = 4;
const FAILOVER_LOAD: Duration = Duration::from_secs(2);

/// One sample of the run, every [`SAMPLE`].
#[derive(Debug, Clone, Default)]
struct Sample {
    at: f64,
    commits_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Lag of the replica and of the cascaded replica, bytes and seconds.
    lag_bytes: [u64; 2],
    lag_seconds: [f64; 2],
}

const SAMPLE: Duration = Duration::from_millis(500);

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.read_ratio) {
        bail!("--read-ratio must be between 0 and 1");
    }
    let scratch = scratch_dir("tidewal-demo-")?;
    let common: Vec<String> = {
        let mut v = vec![
            // Sentinel clients find the primary there (checked after the
            // failover).
            "--sentinel".to_string(),
            "127.0.0.1:0".into(),
            "--shards".to_string(),
            args.shards.to_string(),
            "--executors".into(),
            "1".into(),
            // The nodes share this machine's cores: none polls while idle.
            "--spin-us".into(),
            "0".into(),
            "--election-timeout-ms".into(),
            ELECTION_TIMEOUT_MS.into(),
        ];
        if args.allow_buffered_io {
            v.push("--allow-buffered-io".into());
        }
        v
    };
    let with = |more: &[&str]| -> Vec<String> {
        let mut v = common.clone();
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    println!(
        "tidewal demo: three nodes on loopback under {}",
        scratch.path().display()
    );
    let primary = NodeChild::start(
        "primary",
        &scratch.path().join("primary"),
        &with(&["--commit-level", &args.commit_level]),
    )?;
    let replica = NodeChild::start(
        "replica",
        &scratch.path().join("replica"),
        &with(&["--replica-of", &primary.listen.to_string()]),
    )?;
    let cascade = NodeChild::start(
        "cascade",
        &scratch.path().join("cascade"),
        &with(&["--replica-of", &replica.listen.to_string()]),
    )?;
    println!(
        "  primary {} (admin {}), commit level {}",
        primary.listen, primary.admin, args.commit_level
    );
    println!("  replica {} follows the primary", replica.listen);
    println!("  cascade {} follows the replica", cascade.listen);
    let streaming = |s: &serde_json::Value| s["replicas"][0]["status"] == "streaming";
    wait_status(
        &primary,
        "a streaming replica",
        Duration::from_secs(30),
        streaming,
    )?;
    wait_status(
        &replica,
        "a streaming replica",
        Duration::from_secs(30),
        streaming,
    )?;

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let interval = Arc::new(Mutex::new(latency_histogram()));
    let mut workers = Vec::new();
    for id in 0..args.clients {
        let (stop, writes, reads, errors, interval) = (
            stop.clone(),
            writes.clone(),
            reads.clone(),
            errors.clone(),
            interval.clone(),
        );
        let (p, r) = (
            primary.listen,
            if id % 2 == 0 {
                replica.listen
            } else {
                cascade.listen
            },
        );
        let (value, read_ratio) = (vec![b'v'; args.value_bytes], args.read_ratio);
        workers.push(std::thread::spawn(move || -> anyhow::Result<_> {
            let mut w = Client::connect(p)?;
            let mut rc = Client::connect(r)?;
            let (mut write_h, mut read_h) = (latency_histogram(), latency_histogram());
            let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ (id as u64) << 32;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let key = format!("demo:{id}:{}", rng % 10_000);
                let read = (rng >> 11) as f64 / (1u64 << 53) as f64 <= read_ratio;
                let started = Instant::now();
                let reply = if read {
                    rc.call(&[b"GET", key.as_bytes()])?
                } else {
                    w.call(&[b"SET", key.as_bytes(), &value])?
                };
                let micros = started.elapsed().as_micros() as u64;
                if let Reply::Error(e) = reply {
                    errors.fetch_add(1, Ordering::Relaxed);
                    if errors.load(Ordering::Relaxed) < 5 {
                        eprintln!("client {id}: {e}");
                    }
                    continue;
                }
                if read {
                    read_h.saturating_record(micros.max(1));
                    reads.fetch_add(1, Ordering::Relaxed);
                } else {
                    write_h.saturating_record(micros.max(1));
                    writes.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut h) = interval.lock() {
                        h.saturating_record(micros.max(1));
                    }
                }
                i += 1;
            }
            Ok((write_h, read_h, i))
        }));
    }

    let bar = ProgressBar::new(args.seconds);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} s  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut last_writes = 0;
    let mut last_at = Instant::now();
    while started.elapsed() < Duration::from_secs(args.seconds) {
        std::thread::sleep(SAMPLE);
        let now_writes = writes.load(Ordering::Relaxed);
        let h = std::mem::replace(
            &mut *interval.lock().expect("not poisoned"),
            latency_histogram(),
        );
        let mut sample = Sample {
            at: started.elapsed().as_secs_f64(),
            commits_per_s: (now_writes - last_writes) as f64 / last_at.elapsed().as_secs_f64(),
            p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            ..Sample::default()
        };
        (last_writes, last_at) = (now_writes, Instant::now());
        // The replica's lag as its upstream sees it; the cascade's end to
        // end: what the cascade has durable, read first, against the
        // primary's durable head, read after (so it errs high, never low),
        // and in time the sum of both hops.
        let lsns = |s: &serde_json::Value, field: &str| -> u64 {
            s["shards"].as_array().map_or(0, |a| {
                a.iter().map(|x| x[field].as_u64().unwrap_or(0)).sum()
            })
        };
        let c = cascade.status();
        if let (Ok(c), Ok(r), Ok(p)) = (c, replica.status(), primary.status()) {
            sample.lag_bytes[0] = p["replicas"][0]["lag_bytes"].as_u64().unwrap_or(0);
            sample.lag_seconds[0] = p["replicas"][0]["lag_seconds"].as_f64().unwrap_or(0.0);
            sample.lag_bytes[1] = lsns(&p, "durable_lsn").saturating_sub(lsns(&c, "durable_lsn"));
            sample.lag_seconds[1] =
                sample.lag_seconds[0] + r["replicas"][0]["lag_seconds"].as_f64().unwrap_or(0.0);
        }
        bar.set_position(started.elapsed().as_secs().min(args.seconds));
        bar.set_message(format!(
            "{:>8.0} commits/s  p99 {:>6.2} ms  lag: replica {} B, cascade {} B",
            sample.commits_per_s, sample.p99_ms, sample.lag_bytes[0], sample.lag_bytes[1]
        ));
        samples.push(sample);
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let (mut write_h, mut read_h) = (latency_histogram(), latency_histogram());
    for w in workers {
        let (wh, rh, _) = w
            .join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
        write_h.add(wh)?;
        read_h.add(rh)?;
    }
    let converged = wait_converged(&primary, &[&replica, &cascade], Duration::from_secs(60))
        .context("after the load")?;
    let total = writes.load(Ordering::Relaxed);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!();
    println!(
        "load: {} clients, {:.0} s, {:.0}% reads from the replicas, {}-byte values",
        args.clients,
        elapsed,
        args.read_ratio * 100.0,
        args.value_bytes
    );
    println!(
        "commits ({}): {} in {:.1} s = {:.0}/s; errors {}",
        args.commit_level,
        total,
        elapsed,
        total as f64 / elapsed,
        errors.load(Ordering::Relaxed)
    );
    for (what, h) in [("write", &write_h), ("read ", &read_h)] {
        println!(
            "{what} latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  ({} ops)",
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.99),
            ms(h, 0.999),
            h.max() as f64 / 1000.0,
            h.len()
        );
    }
    for (i, name) in ["replica", "cascade"].iter().enumerate() {
        let max_bytes = samples.iter().map(|s| s.lag_bytes[i]).max().unwrap_or(0);
        let max_s = samples.iter().map(|s| s.lag_seconds[i]).fold(0.0, f64::max);
        let mut lags: Vec<u64> = samples.iter().map(|s| s.lag_bytes[i]).collect();
        lags.sort_unstable();
        let median = lags.get(lags.len() / 2).copied().unwrap_or(0);
        println!(
            "{name} lag during the load{}: median {median} B, max {max_bytes} B, max {max_s:.3} s",
            if i == 1 { " (end to end)" } else { "" }
        );
    }
    println!(
        "all three nodes hold identical logs (lsn, chain per shard) {:.0} ms after the load stopped",
        converged.as_secs_f64() * 1000.0
    );
    println!("\nprimary status (GET /admin/replication/status):");
    println!("{}", serde_json::to_string_pretty(&primary.status()?)?);
    if let Some(path) = &args.plot {
        plot(path, &samples, &args.commit_level)?;
        println!("plot written to {}", path.display());
    }
    if args.no_failover {
        cascade.stop();
        replica.stop();
        primary.stop();
        return Ok(());
    }
    failover(primary, replica, cascade)
}

/// The demo's failover phase: [`failover_once`], printed.
fn failover(primary: NodeChild, replica: NodeChild, cascade: NodeChild) -> anyhow::Result<()> {
    println!(
        "\nfailover: {FAILOVER_WRITERS} clients write at replicated(1) for {:.0} s, then the primary is killed (SIGKILL)",
        FAILOVER_LOAD.as_secs_f64()
    );
    let run = failover_once(primary, replica, cascade, FAILOVER_WRITERS, FAILOVER_LOAD)?;
    println!(
        "  {} acknowledged writes before the kill; the {} was elected primary after {:.2} s (epoch {}), the {} followed it after {:.2} s",
        run.acked,
        run.winner,
        run.elected_after.as_secs_f64(),
        run.epoch,
        run.other,
        run.followed_after.as_secs_f64(),
    );
    println!(
        "  acknowledged writes on the new primary: {} of {} ({} lost); 1000 more replicated(1) writes taken, both logs identical",
        run.acked - run.lost.len(),
        run.acked,
        run.lost.len()
    );
    if run.sentinels_asked > 0 {
        println!(
            "  Redis Sentinel clients: `SENTINEL get-master-addr-by-name tidewal` on the {} node(s) left names the {} ({})",
            run.sentinels_asked, run.winner, run.winner_addr
        );
    }
    run.check()
}

/// What one failover did.
pub struct FailoverRun {
    pub winner: String,
    pub other: String,
    /// The winner's epoch.
    pub epoch: u64,
    /// Writes acknowledged (at `replicated(1)`) before the kill.
    pub acked: usize,
    /// Of those, the ones the new primary does not hold.
    pub lost: Vec<String>,
    /// From the kill to a primary among the others, and to the other one
    /// following it.
    pub elected_after: Duration,
    pub followed_after: Duration,
    /// The Sentinel ports (of the two left) that were asked for the
    /// master, all of which named the new primary.
    pub sentinels_asked: usize,
    pub winner_addr: String,
}

impl FailoverRun {
    /// An error when an acknowledged write was lost.
    pub fn check(&self) -> anyhow::Result<()> {
        if !self.lost.is_empty() {
            bail!(
                "the failover lost {} acknowledged writes, e.g. {:?}",
                self.lost.len(),
                &self.lost[..self.lost.len().min(5)]
            );
        }
        Ok(())
    }
}

/// Makes the three nodes each other's peers; `writers` clients write at
/// `replicated(1)` on the primary for `load`, then the primary is killed
/// (SIGKILL). Waits until `a` or `b` is elected and the other follows it,
/// checks every acknowledged write on the new primary, writes 1000 more
/// there and waits until the two logs are identical; stops both.
pub fn failover_once(
    primary: NodeChild,
    a: NodeChild,
    b: NodeChild,
    writers: usize,
    load: Duration,
) -> anyhow::Result<FailoverRun> {
    let addrs: Vec<String> = [&primary, &a, &b]
        .iter()
        .map(|n| n.listen.to_string())
        .collect();
    for node in [&primary, &a, &b] {
        let mut args: Vec<&[u8]> = vec![b"TIDEWAL.PEERS"];
        args.extend(addrs.iter().map(|a| a.as_bytes()));
        Client::connect(node.listen)?
            .ok(&args)
            .with_context(|| format!("setting {}'s peers", node.name))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..writers)
        .map(|w| -> anyhow::Result<_> {
            let mut c = Client::connect(primary.listen)?;
            c.ok(&[b"CLIENT", b"COMMIT-LEVEL", b"replicated(1)"])?;
            let stop = stop.clone();
            Ok(std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0u64.. {
                    let key = format!("failover:{w}:{i}");
                    match c.call(&[b"SET", key.as_bytes(), &i.to_le_bytes()]) {
                        Ok(Reply::Simple(_)) => acked.push(key),
                        // An error reply (not acknowledged) or the
                        // connection gone with the primary.
                        _ if stop.load(Ordering::Relaxed) => break,
                        _ => {}
                    }
                }
                acked
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    std::thread::sleep(load);
    stop.store(true, Ordering::Relaxed);
    primary.kill()?;
    let killed = Instant::now();
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.join().map_err(|_| anyhow::anyhow!("a writer panicked"))?);
    }
    let limit = Duration::from_secs(30);
    let (winner, other, elected) = loop {
        let (sa, sb) = (a.status()?, b.status()?);
        if sa["role"] == "primary" {
            break (a, b, sa);
        }
        if sb["role"] == "primary" {
            break (b, a, sb);
        }
        if killed.elapsed() > limit {
            bail!(
                "no primary was elected within {limit:?}: {} {sa}, {} {sb}",
                a.name,
                b.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elected_after = killed.elapsed();
    let winner_addr = winner.listen.to_string();
    wait_status(&other, "following the new primary", limit, |s| {
        s["upstream"]["host"] == winner_addr.as_str() && s["upstream"]["connected"] == true
    })?;
    let followed_after = killed.elapsed();
    let mut c = Client::connect(winner.listen)?;
    let mut lost = Vec::new();
    for key in &acked {
        if !matches!(c.ok(&[b"GET", key.as_bytes()])?, Reply::Bulk(Some(_))) {
            lost.push(key.clone());
        }
    }
    c.ok(&[b"CLIENT", b"COMMIT-LEVEL", b"replicated(1)"])?;
    for i in 0..1000u32 {
        c.ok(&[b"SET", format!("after:{i}").as_bytes(), b"v"])?;
    }
    wait_converged(&winner, &[&other], limit).context("after the failover")?;
    // What a Redis Sentinel client asks either node left now names the
    // new primary.
    let mut sentinels_asked = 0;
    for node in [&winner, &other] {
        let Some(port) = node.sentinel else {
            continue;
        };
        let named =
            Client::connect(port)?.ok(&[b"SENTINEL", b"get-master-addr-by-name", b"tidewal"])?;
        let Reply::Array(parts) = &named else {
            bail!("{}'s Sentinel port answered {named:?}", node.name);
        };
        let text = |r: &Reply| match r {
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        let addr = format!(
            "{}:{}",
            parts.first().map(text).unwrap_or_default(),
            parts.get(1).map(text).unwrap_or_default()
        );
        if addr != winner_addr {
            bail!(
                "{}'s Sentinel port names {addr} as master, not the new primary {winner_addr}",
                node.name
            );
        }
        sentinels_asked += 1;
    }
    let run = FailoverRun {
        winner: winner.name.clone(),
        other: other.name.clone(),
        epoch: elected["epoch"].as_u64().unwrap_or(0),
        acked: acked.len(),
        lost,
        elected_after,
        followed_after,
        sentinels_asked,
        winner_addr: winner_addr.clone(),
    };
    other.stop();
    winner.stop();
    Ok(run)
}

/// Write latency (p50, p99) and replica lag over time, as SVG.
fn plot(path: &std::path::Path, samples: &[Sample], level: &str) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(350);
    let end = samples.last().map_or(1.0, |s| s.at);
    let max_ms = samples.iter().map(|s| s.p99_ms).fold(0.1, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(format!("write latency at {level}"), ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end, 0.0..max_ms)?;
    chart.configure_mesh().x_desc("s").y_desc("ms").draw()?;
    for (name, color, pick) in [
        ("p50", BLUE, (|s: &Sample| s.p50_ms) as fn(&Sample) -> f64),
        ("p99", RED, |s: &Sample| s.p99_ms),
    ] {
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.at, pick(s))),
                color,
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;
    let max_lag = samples
        .iter()
        .flat_map(|s| s.lag_bytes)
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("replica lag", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..max_lag)?;
    chart.configure_mesh().x_desc("s").y_desc("bytes").draw()?;
    for (i, (name, color)) in [("replica", GREEN), ("cascade", MAGENTA)]
        .into_iter()
        .enumerate()
    {
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.at, s.lag_bytes[i] as f64)),
                color,
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
