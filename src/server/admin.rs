//! The admin HTTP endpoint: `GET /admin/replication/status` (JSON),
//! `GET /metrics` (Prometheus text), `GET /healthz`, `GET /readyz`.
//!
//! A small HTTP/1.1 server on `httparse`: one request per connection
//! (`Connection: close`), headers capped at 16 KiB and read within a few
//! seconds. Anything that is not a well-formed GET of a known path gets a
//! 4xx and the connection is closed; nothing a client sends can stop it.

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use serde_json::json;

use super::Shared;
use crate::engine::ShardStats;

const HEADER_BYTES_MAX: usize = 16 << 10;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Admin connections served at once; more are closed at once.
const CONNECTIONS_MAX: usize = 64;
/// The whole exchange, read to write, must fit in this.
const DEADLINE: Duration = Duration::from_secs(10);

pub(super) async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let counters = &shared.counters;
    counters.http_requests.fetch_add(1, Ordering::Relaxed);
    if counters.http_connections.fetch_add(1, Ordering::SeqCst) >= CONNECTIONS_MAX {
        counters.http_connections.fetch_sub(1, Ordering::SeqCst);
        counters.http_errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let exchange = glommio::timer::timeout(DEADLINE, async {
        exchange(stream, &shared).await;
        Ok(())
    });
    if exchange.await.is_err() {
        counters.http_errors.fetch_add(1, Ordering::Relaxed);
    }
    counters.http_connections.fetch_sub(1, Ordering::SeqCst);
}

async fn exchange(mut stream: TcpStream, shared: &Arc<Shared>) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let mut head_only = false;
    let response = match read_request(&mut stream).await {
        Ok(Some((method, path))) => {
            head_only = method == "HEAD";
            route(shared, &method, &path).await
        }
        Ok(None) => return,
        Err(status) => text(status, status_text(status)),
    };
    if response.0 >= 400 {
        shared.counters.http_errors.fetch_add(1, Ordering::Relaxed);
    }
    let (status, content_type, body) = response;
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status_text(status),
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    if !head_only {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.close().await;
}

type Response = (u16, &'static str, String);

fn text(status: u16, body: &str) -> Response {
    (status, "text/plain; charset=utf-8", format!("{body}\n"))
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Reads one request head: `(method, path)`, `None` when the peer left
/// without sending anything, or the status to answer.
async fn read_request(stream: &mut TcpStream) -> Result<Option<(String, String)>, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(408),
            Err(_) => return Ok(None),
        };
        if n == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(400) };
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let method = request.method.unwrap_or_default().to_string();
                let path = request.path.unwrap_or_default().to_string();
                return Ok(Some((method, path)));
            }
            Ok(httparse::Status::Partial) if buf.len() <= HEADER_BYTES_MAX => {}
            Ok(httparse::Status::Partial) => return Err(431),
            Err(httparse::Error::TooManyHeaders) => return Err(431),
            Err(_) => return Err(400),
        }
    }
}

async fn route(shared: &Arc<Shared>, method: &str, path: &str) -> Response {
    let path = path.split('?').next().unwrap_or_default();
    let known = matches!(
        path,
        "/healthz" | "/readyz" | "/metrics" | "/admin/replication/status"
    );
    if path == "/admin/replication/resync" {
        if method != "POST" {
            return text(405, "only POST");
        }
        return match shared.resync() {
            Ok(upstream) => text(
                202,
                &format!(
                    "re-syncing every shard from a snapshot of {upstream}; the old logs are kept in quarantine-*/\n"
                ),
            ),
            Err(why) => text(409, why),
        };
    }
    if !known {
        return text(404, "not found");
    }
    if method != "GET" && method != "HEAD" {
        return text(405, "only GET");
    }
    if path == "/healthz" {
        return text(200, "ok");
    }
    let stats = match shared.engine.stats().await {
        Ok(stats) => stats,
        Err(e) => return text(503, &format!("not ready: {e}")),
    };
    match path {
        "/readyz" => {
            let failed: Vec<u32> = stats
                .iter()
                .filter(|s| s.failure.is_some())
                .map(|s| s.shard)
                .collect();
            if shared.stopping() {
                text(503, "shutting down")
            } else if !failed.is_empty() {
                text(
                    503,
                    &format!("shards {failed:?} stopped after a WAL failure"),
                )
            } else {
                text(200, "ready")
            }
        }
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics(shared, &stats),
        ),
        _ => (
            200,
            "application/json",
            serde_json::to_string_pretty(&status(shared, &stats)).unwrap_or_default() + "\n",
        ),
    }
}

/// The status document: the spec's shape (`primary`, `replicas`) and the
/// node's own figures.
pub(super) fn status(shared: &Shared, stats: &[ShardStats]) -> serde_json::Value {
    let level = shared.config.commit_level.to_string();
    let shards: Vec<_> = stats
        .iter()
        .map(|s| {
            json!({
                "shard": s.shard,
                "epoch": s.epoch,
                "epoch_floor": s.epoch_floor,
                "head_lsn": s.next_lsn,
                "chain": s.chain,
                "durable_lsn": s.durable_lsn,
                "first_lsn": s.first_lsn,
                "segments": s.segments,
                "keys": s.keys,
                "failure": s.failure,
            })
        })
        .collect();
    let mut alerts = Vec::new();
    for s in stats {
        if let Some(f) = &s.failure {
            alerts.push(json!({"kind": "wal_failed", "shard": s.shard, "message": f}));
        }
    }
    let head: Vec<u64> = stats.iter().map(|s| s.durable_lsn).collect();
    let first: Vec<u64> = stats.iter().map(|s| s.first_lsn).collect();
    let free_bytes = free_bytes(&shared.config.data_dir);
    let thresholds = shared.config.lag_alert;
    let mut replicas = Vec::new();
    if let Ok(mut downstreams) = shared.downstreams.lock() {
        for d in downstreams.values_mut() {
            let lag: u64 = head
                .iter()
                .zip(&d.flushed)
                .map(|(h, f)| h.saturating_sub(*f))
                .sum();
            // Lag in time: how long the oldest batch it has not made
            // durable was sent ago, or, while it catches up, how long it
            // has been catching up (0 when caught up, also when idle).
            let lag_seconds = if lag == 0 {
                0.0
            } else {
                d.unacked_seconds()
                    .max(d.behind_since.map_or(0.0, |t| t.elapsed().as_secs_f64()))
            };
            let caught_up_sends = head.iter().zip(&d.sent).all(|(h, s)| s >= h);
            let catch_up_seconds = d.catch_up_seconds(lag, head.iter().sum(), caught_up_sends);
            let state = match (
                &d.refused,
                d.connected,
                caught_up_sends && d.behind_since.is_none(),
            ) {
                (Some(_), _, _) => "diverged",
                (None, false, _) => "disconnected",
                (None, true, true) => "streaming",
                (None, true, false) => "catching_up",
            };
            // How much further it may fall behind before the records it
            // needs may be released (it is then re-synced from a
            // snapshot): the WAL kept for replicas, less its lag; without
            // automatic snapshots nothing is released, and the free space
            // of the data directory's filesystem bounds it.
            let retention = shared.config.retention;
            let headroom = if retention.snapshot_every_bytes == 0 {
                free_bytes
            } else {
                d.flushed
                    .iter()
                    .zip(&head)
                    .map(|(f, h)| {
                        retention
                            .downstream_bytes_max
                            .saturating_sub(h.saturating_sub(*f))
                    })
                    .min()
                    .unwrap_or(0)
                    .min(free_bytes)
            };
            let released = d.flushed.iter().zip(&first).any(|(f, first)| f < first);
            let alerting = thresholds.update(&mut d.alert, lag, lag_seconds);
            if alerting {
                alerts.push(json!({
                    "kind": "replica_lag",
                    "replica": d.node_id,
                    "lag_bytes": lag,
                    "lag_seconds": lag_seconds,
                    "message": format!(
                        "replica {} is {} bytes and {:.1} s behind (thresholds {} bytes, {} s)",
                        d.node_id, lag, lag_seconds, thresholds.bytes, thresholds.seconds
                    ),
                }));
            }
            if let Some(why) = &d.refused {
                alerts
                    .push(json!({"kind": "replica_refused", "replica": d.node_id, "message": why}));
            }
            // Its own downstreams, as it reported them, with their lag
            // measured end to end from this node's head.
            let cascaded: Vec<serde_json::Value> = d
                .cascaded
                .as_ref()
                .and_then(|c| c.as_array())
                .into_iter()
                .flatten()
                .filter(|c| c.is_object())
                .map(|c| {
                    let mut c = c.clone();
                    let flushed: Vec<u64> = c["flushed_lsn"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                        .unwrap_or_default();
                    let end_to_end: u64 = head
                        .iter()
                        .zip(&flushed)
                        .map(|(h, f)| h.saturating_sub(*f))
                        .sum();
                    c["lag_bytes_end_to_end"] = json!(end_to_end);
                    c["lag_seconds_end_to_end"] =
                        json!(lag_seconds + c["lag_seconds"].as_f64().unwrap_or(0.0));
                    c
                })
                .collect();
            replicas.push(json!({
                "downstreams": cascaded,
                "host": d.host,
                "node_id": d.node_id,
                "client_address": d.port.ne(&0).then(|| {
                    let (ip, port) = d.client_address();
                    std::net::IpAddr::from_str(&ip)
                        .map_or_else(|_| format!("{ip}:{port}"), |ip| std::net::SocketAddr::new(ip, port).to_string())
                }),
                "counts_for_commit": d.counts,
                "status": if d.resyncing && d.refused.is_none() { "resyncing" } else { state },
                "needs_resync": released,
                "resyncs": d.resyncs,
                "epoch": d.epoch,
                "lag_bytes": lag,
                "lag_seconds": lag_seconds,
                "catch_up_seconds": catch_up_seconds,
                "sent_lsn": d.sent,
                "written_lsn": d.written,
                "flushed_lsn": d.flushed,
                "applied_lsn": d.applied,
                "retention_headroom_bytes": headroom,
                "last_ack_seconds_ago": d.last_ack.map(|t| t.elapsed().as_secs_f64()),
                "refused": d.refused,
                "diverged_range": d.diverged,
                "sync_role": sync_role(shared),
            }));
        }
    }
    let upstream = if shared.is_replica() {
        let link = shared
            .upstream
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default();
        let lag: u64 = link
            .head
            .iter()
            .zip(&link.applied)
            .map(|(h, a)| h.saturating_sub(*a))
            .sum();
        json!({
            "host": shared.replica_of(),
            "connected": link.connected,
            "last_error": link.last_error,
            "last_frame_seconds_ago": link.last_frame.map(|t| t.elapsed().as_secs_f64()),
            "head_lsn": link.head,
            "applied_lsn": link.applied,
            "epoch": link.epoch,
            "lag_bytes": lag,
            "lag_seconds": if lag == 0 { 0.0 } else { link.behind_since.map_or(0.0, |t| t.elapsed().as_secs_f64()) },
            "clock_skew_ms": link.clock_skew_micros as f64 / 1000.0,
            "resyncs": link.resyncs,
            "rewinds": link.rewinds,
        })
    } else {
        serde_json::Value::Null
    };
    let summary = if replicas.is_empty() {
        "this node has no replicas attached".to_string()
    } else {
        format!("{} replica(s), {}", replicas.len(), sync_role(shared))
    };
    let degraded = shared
        .degraded
        .lock()
        .map(|d| {
            (
                d.since.map(|t| t.elapsed().as_secs_f64()),
                d.writes,
                d.failed,
            )
        })
        .unwrap_or_default();
    if let Some(since) = degraded.0 {
        alerts.push(json!({
            "kind": "commits_degraded",
            "message": format!(
                "for {since:.1} s, writes asking for {} are acknowledged at local: not enough replicas are in sync",
                shared.config.commit_level
            ),
        }));
    }
    json!({
        "node_id": shared.node_id,
        "cluster_id": format!("{:032x}", u128::from_be_bytes(shared.cluster())),
        "role": match (shared.is_replica(), shared.config.warm_standby) {
            (false, _) => "primary",
            (true, false) => "replica",
            (true, true) => "standby",
        },
        "primary": if shared.is_replica() { shared.replica_of() } else { shared.listen.to_string() },
        "upstream": upstream,
        "epoch": stats.iter().map(|s| s.epoch).max().unwrap_or(0),
        "commit_policy": {
            "default_level": level,
            "timeout_ms": shared.config.commit_timeout_ms,
            "timeout_policy": shared.config.commit_policy.to_string(),
            "degraded": degraded.0.is_some(),
            "degraded_seconds": degraded.0,
            "writes_degraded": degraded.1,
            "writes_failed_level": degraded.2,
        },
        "replicas": replicas,
        "replication": summary,
        "failover": super::failover::status(shared),
        "shards": shards,
        "alerts": alerts,
        "uptime_seconds": shared.started.elapsed().as_secs(),
    })
}

/// Free bytes of the filesystem holding `dir` (0 when unknown).
fn free_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed struct to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

/// What a replica reports upstream of its own downstreams (`None` when it
/// has none): the same entries as its status page's `replicas`.
pub(super) fn downstream_report(shared: &Shared, stats: &[ShardStats]) -> Option<Vec<u8>> {
    if shared.downstreams.lock().map_or(true, |d| d.is_empty()) {
        return None;
    }
    let doc = status(shared, stats);
    serde_json::to_vec(&doc["replicas"]).ok()
}

/// How writes of the node's default level treat its replicas.
fn sync_role(shared: &Shared) -> &'static str {
    if shared.config.commit_level.needs_replicas() {
        "sync"
    } else {
        "async"
    }
}

/// A histogram read off an hdrhistogram at fixed bucket bounds.
#[derive(Debug)]
struct Buckets {
    sum: f64,
    count: u64,
    /// (upper bound, samples in this bucket only).
    buckets: Vec<(f64, u64)>,
}

impl Buckets {
    fn from_hdr(h: &hdrhistogram::Histogram<u64>, bounds: &[u64], scale: f64) -> Self {
        let mut buckets = Vec::new();
        let mut below = 0u64;
        for &bound in bounds {
            let upto = h.count_between(0, bound);
            buckets.push((bound as f64 * scale, upto - below));
            below = upto;
        }
        buckets.push((f64::INFINITY, h.len() - below));
        let sum = h.mean() * h.len() as f64 * scale;
        Self {
            sum,
            count: h.len(),
            buckets,
        }
    }
}

impl EncodeMetric for Buckets {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum,
            self.count,
            &self.buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReplicaLabel {
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ShardLabel {
    shard: u32,
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

fn gauge(value: i64) -> Gauge {
    let g = Gauge::default();
    g.set(value);
    g
}

fn metrics(shared: &Shared, stats: &[ShardStats]) -> String {
    let mut registry = Registry::with_prefix("tidewal");
    let c = &shared.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    registry.register(
        "connections",
        "Clients connected now",
        gauge(c.connections.load(Ordering::Relaxed) as i64),
    );
    registry.register(
        "connections_accepted",
        "Clients accepted",
        counter(load(&c.connections_total)),
    );
    registry.register(
        "connections_rejected",
        "Clients turned away at the connection limit",
        counter(load(&c.rejected)),
    );
    registry.register("commands", "Commands processed", counter(load(&c.commands)));
    registry.register(
        "protocol_errors",
        "Connections closed for malformed input",
        counter(load(&c.protocol_errors)),
    );
    registry.register(
        "http_requests",
        "Admin HTTP requests",
        counter(load(&c.http_requests)),
    );
    registry.register(
        "http_errors",
        "Admin HTTP requests answered 4xx/5xx, refused or timed out",
        counter(load(&c.http_errors)),
    );

    // The status page's figures, so that both say the same.
    let doc = status(shared, stats);
    let lag_bytes = Family::<ReplicaLabel, Gauge>::default();
    let lag_seconds = Family::<ReplicaLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let connected = Family::<ReplicaLabel, Gauge>::default();
    let catch_up = Family::<ReplicaLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for r in doc["replicas"].as_array().into_iter().flatten() {
        let label = ReplicaLabel {
            replica: r["node_id"].as_str().unwrap_or("").to_string(),
        };
        lag_bytes
            .get_or_create(&label)
            .set(r["lag_bytes"].as_i64().unwrap_or(0));
        lag_seconds
            .get_or_create(&label)
            .set(r["lag_seconds"].as_f64().unwrap_or(0.0));
        connected.get_or_create(&label).set(i64::from(
            r["status"] == "streaming" || r["status"] == "catching_up",
        ));
        // Absent while there is no estimate (null on the status page).
        if let Some(seconds) = r["catch_up_seconds"].as_f64() {
            catch_up.get_or_create(&label).set(seconds);
        }
    }
    registry.register_with_unit(
        "replica_lag",
        "Bytes of durable log a replica has not yet made durable",
        Unit::Bytes,
        lag_bytes,
    );
    registry.register_with_unit(
        "replica_lag",
        "How long ago the oldest batch a replica has not made durable was sent",
        Unit::Seconds,
        lag_seconds,
    );
    registry.register(
        "replica_connected",
        "1 while a replica streams or catches up",
        connected,
    );
    registry.register_with_unit(
        "replica_catch_up",
        "Estimated time until a replica holds what this node holds now (catch_up_seconds)",
        Unit::Seconds,
        catch_up,
    );
    let policy = &doc["commit_policy"];
    registry.register(
        "commits_degraded",
        "1 while commits are acknowledged below their level (degrade policy)",
        gauge(i64::from(policy["degraded"] == true)),
    );
    registry.register(
        "writes_degraded",
        "Writes acknowledged below their commit level (degrade policy)",
        counter(policy["writes_degraded"].as_u64().unwrap_or(0)),
    );
    registry.register(
        "writes_failed_level",
        "Writes answered -TIMEOUT: durable here, replicas did not answer in time (fail policy)",
        counter(policy["writes_failed_level"].as_u64().unwrap_or(0)),
    );
    if let Some(lag) = doc["upstream"]["lag_bytes"].as_i64() {
        registry.register_with_unit(
            "upstream_lag",
            "On a replica: bytes of the upstream's durable log not yet applied here",
            Unit::Bytes,
            gauge(lag),
        );
    }

    let per_shard = |f: &dyn Fn(&ShardStats) -> u64| {
        let family = Family::<ShardLabel, Counter>::default();
        for s in stats {
            family
                .get_or_create(&ShardLabel { shard: s.shard })
                .inc_by(f(s));
        }
        family
    };
    registry.register(
        "wal_commits",
        "Records made durable (commits)",
        per_shard(&|s| s.wal.records),
    );
    registry.register(
        "wal_syncs",
        "WAL write + sync rounds (group commits)",
        per_shard(&|s| s.wal.syncs),
    );
    registry.register_with_unit(
        "wal_record",
        "Record bytes made durable",
        Unit::Bytes,
        per_shard(&|s| s.wal.record_bytes),
    );
    registry.register_with_unit(
        "wal_device_written",
        "Bytes written to the device, with rewritten tail blocks and headers",
        Unit::Bytes,
        per_shard(&|s| s.wal.device_bytes),
    );
    registry.register_with_unit(
        "wal_pad",
        "Of the record bytes, padding records that end a batch on a block boundary so the next write can go beside it",
        Unit::Bytes,
        per_shard(&|s| s.wal.pad_bytes),
    );
    registry.register(
        "wal_writes",
        "WAL writes issued (one per batch, or two when a batch is split)",
        per_shard(&|s| s.wal.writes),
    );
    registry.register(
        "wal_writes_beside",
        "WAL writes issued while another write of the shard was on the device",
        per_shard(&|s| s.wal.writes_beside),
    );
    registry.register(
        "wal_rotations",
        "Segments started",
        per_shard(&|s| s.wal.rotations),
    );
    registry.register(
        "wal_reads_from_memory",
        "Reads of the WAL by position (replication) served from the recent batches in memory",
        per_shard(&|s| s.wal.reads_from_memory),
    );
    registry.register(
        "wal_reads_from_disk",
        "Reads of the WAL by position (replication) that went to the segments on disk",
        per_shard(&|s| s.wal.reads_from_disk),
    );
    let lsn = |f: &dyn Fn(&ShardStats) -> u64| {
        let family = Family::<ShardLabel, Gauge>::default();
        for s in stats {
            family
                .get_or_create(&ShardLabel { shard: s.shard })
                .set(f(s) as i64);
        }
        family
    };
    registry.register(
        "wal_head_lsn",
        "Where the next record goes",
        lsn(&|s| s.next_lsn),
    );
    registry.register(
        "wal_durable_lsn",
        "Everything below is durable",
        lsn(&|s| s.durable_lsn),
    );
    registry.register("keys", "Keys held", lsn(&|s| s.keys as u64));
    registry.register(
        "shard_failed",
        "1 when the shard stopped after a WAL failure",
        lsn(&|s| u64::from(s.failure.is_some())),
    );

    let mut sync =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2).expect("bounds");
    let mut batch = sync.clone();
    let mut write = sync.clone();
    for s in stats {
        let _ = sync.add(&s.wal.sync_micros);
        let _ = batch.add(&s.wal.batch_records);
        let _ = write.add(&s.wal.write_micros);
    }
    let micros = [
        25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
    ];
    registry.register_with_unit(
        "wal_sync_duration",
        "fdatasync latency, every shard (with O_DSYNC writes only the confirmation after them: see wal_write_duration)",
        Unit::Seconds,
        Buckets::from_hdr(&sync, &micros, 1e-6),
    );
    registry.register_with_unit(
        "wal_write_duration",
        "WAL write latency, issue to completion, every shard (with O_DSYNC writes, what makes a batch durable)",
        Unit::Seconds,
        Buckets::from_hdr(&write, &micros, 1e-6),
    );
    let sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];
    registry.register(
        "wal_batch_records",
        "Records made durable by one sync (group-commit batch size)",
        Buckets::from_hdr(&batch, &sizes, 1.0),
    );
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        let _ = writeln!(out, "# encoding failed");
    }
    out
}
