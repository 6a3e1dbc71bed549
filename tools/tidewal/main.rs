//! `tidewal`: the command-line entry point.
//!
//! - `tidewal wal inspect DIR`: list and verify a shard's WAL (like pg_waldump).
//! - `tidewal wal stress --dir DIR`: append from many tasks and print each ack;
//!   a soak tool, and what the kill -9 crash test drives.
//! - `tidewal demo`: the main job: a primary, a replica and a cascaded
//!   replica on loopback under load; throughput, latency and lag.
//! - `tidewal node`: the server (Redis protocol, admin HTTP) until SIGTERM.
//! - `tidewal bench replication`: commits/s and latency per commit level
//!   with replicas, against Redis with WAIT; lag; catch-up speed.
//! - `tidewal bench wal`: durable append throughput and latency against the
//!   disk's own ceiling, measured in the same run.

mod backup;
mod bench_failover;
mod bench_repl;
mod bench_wal;
mod cluster;
mod demo;
mod inspect;
mod node;
mod stress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tidewal",
    version,
    about = "A replicated storage engine for NVMe hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A primary, a replica and a cascaded replica on loopback under a mixed
    /// load at `replicated(1)`: commits/s, latency percentiles, lag, status.
    Demo(demo::DemoArgs),
    /// Run a node: clients over the Redis protocol (RESP2), an admin HTTP
    /// endpoint; stops cleanly on SIGTERM or SIGINT.
    Node(node::NodeArgs),
    /// Write-ahead log tools.
    #[command(subcommand)]
    Wal(WalCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Back up a running node (a replica, so the primary does no work):
    /// a snapshot of every shard and a manifest, into a new directory.
    Backup(backup::BackupArgs),
    /// Make a data directory of a backup, for `tidewal node --data-dir`.
    Restore(backup::RestoreArgs),
}

#[derive(Subcommand)]
enum WalCommand {
    /// List a WAL directory's segments and records and verify the chain.
    /// Exits 0 when the log is intact, 1 with the segment and offset of the
    /// first bad record when it is not, 2 when it cannot be read.
    Inspect {
        /// The directory holding `{base_lsn:020}.wal` segment files.
        dir: PathBuf,
        /// Print segments and the verdict only, not every record.
        #[arg(long)]
        summary: bool,
    },
    /// Append from many tasks until stopped, printing `ack WHO SEQ LSN` for
    /// every append whose sync completed.
    Stress(stress::StressArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Durable appends/s and latency at several concurrencies, and MB/s with
    /// large records, beside the disk's own ceiling from the same run.
    Wal(bench_wal::BenchArgs),
    /// Durable commits/s and latency at each commit level with one and two
    /// replicas (and Redis with WAIT where installed), lag, catch-up speed.
    Replication(bench_repl::BenchReplArgs),
    /// Automatic failover over many runs: time to elect a new primary and
    /// to follow it after a SIGKILL, and acknowledged writes lost (none).
    Failover(bench_failover::BenchFailoverArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter())),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args).map(|()| ExitCode::SUCCESS),
        Command::Node(args) => node::run(args).map(|()| ExitCode::SUCCESS),
        Command::Wal(WalCommand::Inspect { dir, summary }) => inspect::run(&dir, summary),
        Command::Wal(WalCommand::Stress(args)) => stress::run(args).map(|()| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::Wal(args)) => bench_wal::run(args).map(|()| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::Replication(args)) => {
            bench_repl::run(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Failover(args)) => {
            bench_failover::run(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Backup(args) => backup::backup(args).map(|()| ExitCode::SUCCESS),
        Command::Restore(args) => backup::restore(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `info` for the server (it says when it serves and stops), `warn` for
/// the tools; `RUST_LOG` overrides either.
fn default_filter() -> &'static str {
    match std::env::args().nth(1).as_deref() {
        Some("node") => "info",
        _ => "warn",
    }
}
