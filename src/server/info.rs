//! `INFO`, in Redis's `# Section` / `field:value` layout, and the figures
//! it shares with the status endpoint.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Shared;
use crate::engine::{EngineError, ShardStats};

/// Renders the sections asked for (`None`, `all`, `everything`, `default`:
/// all of them).
pub(super) async fn render(
    shared: &Arc<Shared>,
    section: Option<&str>,
) -> Result<String, EngineError> {
    let stats = shared.engine.stats().await?;
    let all = matches!(section, None | Some("all" | "everything" | "default"));
    let want = |name: &str| all || section == Some(name);
    let mut out = String::new();
    let c = &shared.counters;
    if want("server") {
        let _ = write!(
            out,
            "# Server\r\nredis_version:7.0.0\r\ntidewal_version:{}\r\nredis_mode:standalone\r\nos:{}\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\nexecutors:{}\r\nshards:{}\r\nnode_id:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::process::id(),
            shared.listen.port(),
            shared.started.elapsed().as_secs(),
            shared.engine.executor_count(),
            shared.engine.shard_count(),
            shared.node_id,
        );
    }
    if want("clients") {
        let _ = write!(
            out,
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\n\r\n",
            c.connections.load(Ordering::Relaxed),
            shared.config.limits.connections_max,
        );
    }
    if want("replication") {
        // The status page's figures, in Redis's `slaveN:` shape plus ours.
        let doc = super::admin::status(shared, &stats);
        let replicas = doc["replicas"].as_array().cloned().unwrap_or_default();
        let connected = replicas
            .iter()
            .filter(|r| r["status"] == "streaming" || r["status"] == "catching_up")
            .count();
        let _ = write!(
            out,
            "# Replication\r\nrole:{}\r\nconnected_slaves:{connected}\r\n",
            if shared.is_replica() {
                "slave"
            } else {
                "master"
            },
        );
        if shared.is_replica() {
            let up = &doc["upstream"];
            let (host, port) = shared
                .replica_of()
                .rsplit_once(':')
                .map(|(h, p)| (h.to_string(), p.to_string()))
                .unwrap_or_default();
            let _ = write!(
                out,
                "master_host:{host}\r\nmaster_port:{port}\r\nmaster_link_status:{}\r\nmaster_last_io_seconds_ago:{}\r\nmaster_lag_bytes:{}\r\nmaster_lag_seconds:{:.3}\r\n",
                if up["connected"] == true {
                    "up"
                } else {
                    "down"
                },
                up["last_frame_seconds_ago"]
                    .as_f64()
                    .map_or(-1, |s| s as i64),
                up["lag_bytes"].as_u64().unwrap_or(0),
                up["lag_seconds"].as_f64().unwrap_or(0.0),
            );
        }
        for (i, r) in replicas.iter().enumerate() {
            // Where clients reach it (as ROLE says), else where its stream
            // comes from.
            let host = r["client_address"]
                .as_str()
                .or(r["host"].as_str())
                .unwrap_or("");
            let (ip, port) = host.rsplit_once(':').unwrap_or((host, "0"));
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            let flushed: u64 = r["flushed_lsn"]
                .as_array()
                .map_or(0, |a| a.iter().filter_map(|x| x.as_u64()).sum());
            let _ = write!(
                out,
                "slave{i}:id={},ip={ip},port={port},state={},offset={flushed},lag={:.0},lag_bytes={},lag_seconds={:.3}\r\n",
                r["node_id"].as_str().unwrap_or(""),
                match r["status"].as_str().unwrap_or("") {
                    "streaming" => "online",
                    other => other,
                },
                r["last_ack_seconds_ago"].as_f64().unwrap_or(-1.0),
                r["lag_bytes"].as_u64().unwrap_or(0),
                r["lag_seconds"].as_f64().unwrap_or(0.0),
            );
        }
        let policy = &doc["commit_policy"];
        let _ = write!(
            out,
            "master_repl_offset:{}\r\nepoch:{}\r\ncommit_level:{}\r\ncommit_policy:{}\r\ncommits_degraded:{}\r\n\r\n",
            stats.iter().map(|s| s.next_lsn).sum::<u64>(),
            stats.iter().map(|s| s.epoch).max().unwrap_or(0),
            shared.config.commit_level,
            shared.config.commit_policy,
            u8::from(policy["degraded"] == true),
        );
    }
    if want("persistence") {
        let level = shared.config.commit_level.to_string();
        let failed = stats.iter().filter(|s| s.failure.is_some()).count();
        let _ = write!(
            out,
            "# Persistence\r\nloading:0\r\naof_enabled:1\r\ncommit_level:{level}\r\nwal_durable_lsn:{}\r\nwal_head_lsn:{}\r\nwal_syncs:{}\r\nwal_records:{}\r\nwal_record_bytes:{}\r\nwal_pad_bytes:{}\r\nwal_device_bytes:{}\r\nwal_segments:{}\r\nwal_sync_p50_us:{}\r\nwal_sync_p99_us:{}\r\nshards_failed:{failed}\r\n\r\n",
            stats.iter().map(|s| s.durable_lsn).sum::<u64>(),
            stats.iter().map(|s| s.next_lsn).sum::<u64>(),
            sum(&stats, |s| s.wal.syncs),
            sum(&stats, |s| s.wal.records),
            sum(&stats, |s| s.wal.record_bytes),
            sum(&stats, |s| s.wal.pad_bytes),
            sum(&stats, |s| s.wal.device_bytes),
            stats.iter().map(|s| s.segments).sum::<usize>(),
            sync_quantile(&stats, 0.5),
            sync_quantile(&stats, 0.99),
        );
    }
    if want("stats") {
        let _ = write!(
            out,
            "# Stats\r\ntotal_connections_received:{}\r\nrejected_connections:{}\r\ntotal_commands_processed:{}\r\nprotocol_errors:{}\r\n\r\n",
            c.connections_total.load(Ordering::Relaxed),
            c.rejected.load(Ordering::Relaxed),
            c.commands.load(Ordering::Relaxed),
            c.protocol_errors.load(Ordering::Relaxed),
        );
    }
    if want("keyspace") {
        let keys: usize = stats.iter().map(|s| s.keys).sum();
        let _ = write!(out, "# Keyspace\r\n");
        if keys > 0 {
            let _ = write!(out, "db0:keys={keys},expires=0,avg_ttl=0\r\n");
        }
    }
    Ok(out)
}

fn sum(stats: &[ShardStats], f: impl Fn(&ShardStats) -> u64) -> u64 {
    stats.iter().map(f).sum()
}

/// A quantile of every shard's sync latency, in microseconds.
pub(super) fn sync_quantile(stats: &[ShardStats], q: f64) -> u64 {
    let mut all =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds");
    for s in stats {
        let _ = all.add(&s.wal.sync_micros);
    }
    if all.is_empty() {
        0
    } else {
        all.value_at_quantile(q)
    }
}
