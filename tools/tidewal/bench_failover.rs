//! `tidewal bench failover`: automatic failover, measured over many runs.
//! Each run starts three nodes on loopback (a primary and two replicas, or
//! with `--cascade` a replica and a replica of it), writes at
//! `replicated(1)` from a few clients, kills the primary (SIGKILL), and
//! measures how long the others take to elect a new primary and to follow
//! it, and checks every acknowledged write on it (`demo::failover_once`).

use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::cluster::{NodeChild, latency_histogram, scratch_dir, wait_status};
use crate::demo::failover_once;

#[derive(Args, Debug)]
pub struct BenchFailoverArgs {
    /// Failovers to measure, each on three new nodes.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// The nodes' election timeout (`tidewal node --election-timeout-ms`).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    election_timeout_ms: u64,
    /// Clients writing at `replicated(1)` until the kill.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Seconds of writes before the kill.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// The second replica follows the first (a cascade), not the primary.
    #[arg(long)]
    cascade: bool,
    /// Run where O_DIRECT is not in effect (tmpfs): not durable.
    #[arg(long)]
    allow_buffered_io: bool,
}

pub fn run(args: BenchFailoverArgs) -> anyhow::Result<()> {
    let topology = if args.cascade {
        "a primary, a replica and a replica of that replica"
    } else {
        "a primary and two replicas"
    };
    println!(
        "tidewal bench failover: {} runs; {topology}; election timeout {} ms; {} clients at replicated(1) for {:.1} s, then SIGKILL to the primary",
        args.runs, args.election_timeout_ms, args.writers, args.seconds
    );
    let (mut elected, mut followed) = (latency_histogram(), latency_histogram());
    let (mut acked, mut lost) = (0usize, 0usize);
    for i in 1..=args.runs {
        let scratch = scratch_dir("tidewal-bench-failover-")?;
        let mut common = vec![
            "--shards".to_string(),
            "2".into(),
            "--executors".into(),
            "1".into(),
            // The nodes share this machine's cores: none polls while idle.
            "--spin-us".into(),
            "0".into(),
            "--election-timeout-ms".into(),
            args.election_timeout_ms.to_string(),
        ];
        if args.allow_buffered_io {
            common.push("--allow-buffered-io".into());
        }
        let with = |more: &[&str]| -> Vec<String> {
            let mut v = common.clone();
            v.extend(more.iter().map(|s| s.to_string()));
            v
        };
        let primary = NodeChild::start("primary", &scratch.path().join("p"), &with(&[]))?;
        let a = NodeChild::start(
            "a",
            &scratch.path().join("a"),
            &with(&["--replica-of", &primary.listen.to_string()]),
        )?;
        let upstream = if args.cascade {
            a.listen
        } else {
            primary.listen
        };
        let b = NodeChild::start(
            "b",
            &scratch.path().join("b"),
            &with(&["--replica-of", &upstream.to_string()]),
        )?;
        let streaming = |s: &serde_json::Value| {
            s["upstream"]["connected"] == true && s["upstream"]["lag_bytes"] == 0
        };
        for node in [&a, &b] {
            wait_status(node, "following", Duration::from_secs(30), streaming)?;
        }
        let run = failover_once(
            primary,
            a,
            b,
            args.writers,
            Duration::from_secs_f64(args.seconds),
        )
        .with_context(|| format!("run {i}"))?;
        println!(
            "  run {i:>2}: {} elected after {:.2} s (epoch {}), {} followed after {:.2} s; {} acknowledged writes, {} lost",
            run.winner,
            run.elected_after.as_secs_f64(),
            run.epoch,
            run.other,
            run.followed_after.as_secs_f64(),
            run.acked,
            run.lost.len()
        );
        elected.saturating_record(run.elected_after.as_micros() as u64);
        followed.saturating_record(run.followed_after.as_micros() as u64);
        acked += run.acked;
        lost += run.lost.len();
    }
    let s = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e6;
    for (what, h) in [
        ("new primary elected", &elected),
        ("other node following it", &followed),
    ] {
        println!(
            "{what}, seconds after the kill: min {:.2}  p50 {:.2}  p90 {:.2}  max {:.2}",
            h.min() as f64 / 1e6,
            s(h, 0.5),
            s(h, 0.9),
            h.max() as f64 / 1e6
        );
    }
    println!(
        "acknowledged writes: {acked} over {} runs, {lost} lost",
        args.runs
    );
    anyhow::ensure!(lost == 0, "{lost} acknowledged writes were lost");
    Ok(())
}
