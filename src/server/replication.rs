//! WAL streaming between nodes, over the client port.
//!
//! A downstream (a replica) connects to its upstream's client port and
//! sends `TIDEWAL.STREAM`; the upstream answers `+STREAM` and the
//! connection carries replication frames (`crate::format::frame`) from then
//! on. The downstream sends one `Hello` per shard with where its log ends
//! (`lsn`, `chain`); the upstream streams each shard's durable records from
//! there, as `Records` frames holding the bytes exactly as on its disk, and
//! the downstream checks that they continue its log, stages the same bytes,
//! applies them, and answers with an `Ack` of what is durable. A position
//! the upstream cannot continue (a different chain at that LSN, a log ahead
//! of the upstream's, or records already released) gets a `Refuse` naming
//! why, and the downstream stops and reports it rather than truncating
//! anything.
//!
//! This is asynchronous replication: a write is acknowledged to its client
//! by the primary's own commit level. Commit levels that wait for replicas,
//! snapshot re-sync, heartbeats and cascading status come next (issue 5).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use zerocopy::IntoBytes;

use super::Shared;
use crate::engine::CommitLevel;
use crate::format::{
    Ack, Expect, FrameKind, Hello, decode_fixed, decode_frame, encode_frame, frame_header,
};

/// Largest frame payload either side accepts.
const PAYLOAD_MAX: usize = 4 << 20;
/// Bytes of records one `Records` frame carries, about.
const BATCH_BYTES: usize = 256 << 10;
/// The command that turns a client connection into a replication stream.
pub(super) const STREAM_COMMAND: &[u8] = b"TIDEWAL.STREAM";

/// What the upstream knows of one downstream, for the status page.
#[derive(Debug, Clone)]
pub(super) struct Downstream {
    pub host: String,
    pub node_id: String,
    pub connected: bool,
    /// Per shard: next LSN to send, and LSN below which the downstream
    /// reported its log durable.
    pub sent: Vec<u64>,
    pub flushed: Vec<u64>,
    pub last_ack: Option<Instant>,
    /// Since when the downstream has been behind (`None`: caught up).
    pub behind_since: Option<Instant>,
    pub refused: Option<String>,
}

/// What a downstream knows of its link to the upstream.
#[derive(Debug, Clone, Default)]
pub(super) struct Upstream {
    pub connected: bool,
    pub last_error: Option<String>,
    pub last_frame: Option<Instant>,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Reads the next frame, keeping what follows it in `input`. `None` when
/// the peer closed or the node is stopping.
async fn next_frame(
    stream: &mut (impl futures_lite::AsyncRead + Unpin),
    input: &mut BytesMut,
    shared: &Shared,
) -> std::io::Result<Option<(FrameKind, u32, u64, u64, Bytes)>> {
    loop {
        if let Some(f) = decode_frame(input, PAYLOAD_MAX).map_err(io_err)? {
            let (kind, shard, epoch, start) = (f.kind, f.shard, f.epoch, f.start_lsn);
            let consumed = f.consumed;
            let frame = input.split_to(consumed).freeze();
            let payload = frame.slice(crate::format::FRAME_HEADER_BYTES..);
            return Ok(Some((kind, shard, epoch, start, payload)));
        }
        let len = input.len();
        input.resize(len + (64 << 10), 0);
        let n = loop {
            match stream.read(&mut input[len..]).await {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    if shared.stopping() {
                        input.truncate(len);
                        return Ok(None);
                    }
                }
                Err(e) => {
                    input.truncate(len);
                    return Err(e);
                }
            }
        };
        input.truncate(len + n);
        if n == 0 {
            return Ok(None);
        }
    }
}

fn frame(kind: FrameKind, shard: u32, epoch: u64, start: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(crate::format::FRAME_HEADER_BYTES + payload.len());
    encode_frame(&mut out, kind, shard, epoch, start, payload);
    out
}

/// The upstream side: serves one downstream until it leaves or the node
/// stops. `input` holds what the connection had already received.
pub(super) async fn serve_downstream(stream: TcpStream, shared: Arc<Shared>, mut input: BytesMut) {
    let host = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    let result = async {
        let shard_count = shared.engine.shard_count();
        // One Hello per shard, first, within a few seconds: a downstream
        // with another shard count sends too many or too few.
        let mut hellos: BTreeMap<u32, Hello> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while hellos.len() < shard_count as usize {
            let next = glommio::timer::timeout(
                deadline.saturating_duration_since(Instant::now()),
                async { Ok(next_frame(&mut reader, &mut input, &shared).await) },
            )
            .await;
            let problem = match next {
                Err(_) => Some(format!(
                    "expected {shard_count} Hello frames (one per shard), got {}: do the shard counts differ?",
                    hellos.len()
                )),
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Some((kind, shard, _, _, payload)))) => {
                    let hello = match kind {
                        FrameKind::Hello => Some(Hello::decode(&payload).map_err(io_err)?),
                        _ => None,
                    };
                    match hello {
                        Some(h) if h.shard_count == shard_count && shard < shard_count => {
                            hellos.insert(shard, h);
                            None
                        }
                        Some(h) => Some(format!(
                            "the downstream has {} shards and this node {shard_count}: keys would land in other shards; the shard counts differ",
                            h.shard_count
                        )),
                        None => Some(format!("expected a Hello frame, got {kind:?}")),
                    }
                }
            };
            if let Some(why) = problem {
                refused(&shared, "", &host, &why);
                writer.write_all(&frame(FrameKind::Refuse, 0, 0, 0, why.as_bytes())).await?;
                return Err(io_err(why));
            }
        }
        let node_id = hellos.values().next().map(|h| h.node_id.clone()).unwrap_or_default();
        let stats = shared.engine.stats().await.map_err(io_err)?;
        let mut pos = Vec::new();
        for (shard, hello) in &hellos {
            let s = &stats[*shard as usize];
            let problem = if hello.lsn > s.durable_lsn {
                Some(format!(
                    "shard {shard}: the downstream's log ends at {} past this node's {}: it holds writes this node never had (diverged, or another cluster)",
                    hello.lsn, s.durable_lsn
                ))
            } else if hello.lsn < s.first_lsn {
                Some(format!(
                    "shard {shard}: lsn {} was released here (the log starts at {}): the downstream needs a snapshot re-sync",
                    hello.lsn, s.first_lsn
                ))
            } else {
                None
            };
            if let Some(why) = problem {
                refused(&shared, &node_id, &host, &why);
                writer.write_all(&frame(FrameKind::Refuse, *shard, s.epoch, 0, why.as_bytes())).await?;
                return Err(io_err(why));
            }
            pos.push(Expect {
                lsn: hello.lsn,
                chain: hello.chain,
                epoch: hello.history.last().map_or(0, |(e, _)| *e),
            });
        }
        let status = Downstream {
            host: host.clone(),
            node_id: node_id.clone(),
            connected: true,
            sent: pos.iter().map(|p| p.lsn).collect(),
            flushed: pos.iter().map(|p| p.lsn).collect(),
            last_ack: None,
            behind_since: None,
            refused: None,
        };
        let key = if node_id.is_empty() { host.clone() } else { node_id.clone() };
        if let Ok(mut d) = shared.downstreams.lock() {
            d.insert(key.clone(), status);
        }
        tracing::info!(downstream = %key, "replica attached");
        // Acks come back on a task of their own.
        let ack_done = std::rc::Rc::new(std::cell::Cell::new(false));
        let acks = {
            let (shared, key, done) = (shared.clone(), key.clone(), ack_done.clone());
            let _done = DoneOnDrop(done);
            glommio::spawn_local(async move {
                let _done = _done;
                while let Ok(Some((kind, shard, _, _, payload))) =
                    next_frame(&mut reader, &mut input, &shared).await
                {
                    match kind {
                        FrameKind::Ack => {
                            let Ok(ack) = decode_fixed::<Ack>(kind, &payload) else {
                                return;
                            };
                            if let Ok(mut d) = shared.downstreams.lock()
                                && let Some(d) = d.get_mut(&key)
                                && let Some(f) = d.flushed.get_mut(shard as usize)
                            {
                                *f = ack.flushed.get().max(*f);
                                d.last_ack = Some(Instant::now());
                            }
                        }
                        FrameKind::Refuse => {
                            let why = String::from_utf8_lossy(&payload).to_string();
                            tracing::warn!(downstream = %key, %why, "replica refused the stream");
                            if let Ok(mut d) = shared.downstreams.lock()
                                && let Some(d) = d.get_mut(&key)
                            {
                                d.refused = Some(why);
                            }
                            return;
                        }
                        _ => return,
                    }
                }
            })
        };
        let mut acks = Some(acks);
        let mut idle = Duration::from_millis(1);
        loop {
            if shared.stopping() || ack_done.get() {
                break;
            }
            let mut sent_any = false;
            for shard in 0..shard_count {
                let i = shard as usize;
                let batch = shared
                    .engine
                    .read_log(shard, pos[i], BATCH_BYTES)
                    .await;
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        let why = format!(
                            "shard {shard}: the downstream's log does not continue here at lsn {} (diverged): {e}",
                            pos[i].lsn
                        );
                        refused(&shared, &key, &host, &why);
                        writer.write_all(&frame(FrameKind::Refuse, shard, 0, 0, why.as_bytes())).await?;
                        return Err(io_err(why));
                    }
                };
                let Some(last) = batch.records.last() else {
                    continue;
                };
                let mut payload = Vec::new();
                for r in &batch.records {
                    payload.extend_from_slice(&r.encoded);
                }
                // The header, then the records where they already are: one
                // copy of the bytes (gathering them), not two.
                let header =
                    frame_header(FrameKind::Records, shard, last.epoch, pos[i].lsn, &payload);
                writer.write_all(header.as_bytes()).await?;
                writer.write_all(&payload).await?;
                pos[i] = batch.next;
                sent_any = true;
                if let Ok(mut d) = shared.downstreams.lock()
                    && let Some(d) = d.get_mut(&key)
                {
                    d.sent[i] = pos[i].lsn;
                }
            }
            writer.flush().await?;
            // Nothing new: look again soon, less often the longer it stays
            // quiet (1 ms up to 20 ms), so an idle primary costs little.
            if sent_any {
                idle = Duration::from_millis(1);
            } else {
                glommio::timer::sleep(idle).await;
                idle = (idle * 2).min(Duration::from_millis(20));
            }
        }
        drop(acks.take());
        Ok::<(), std::io::Error>(())
    }
    .await;
    if let Err(e) = result {
        tracing::info!(downstream = %host, error = %e, "replication stream ended");
    }
    if let Ok(mut d) = shared.downstreams.lock() {
        for d in d.values_mut().filter(|d| d.host == host) {
            d.connected = false;
        }
    }
    let _ = writer.close().await;
}

/// The downstream side: follows `upstream` until the node stops,
/// reconnecting after a broken link; stops for good when refused.
pub(super) async fn follow(shared: Arc<Shared>, upstream: String) {
    loop {
        if shared.stopping() {
            return;
        }
        let result = follow_once(&shared, &upstream).await;
        let refused = matches!(&result, Err(e) if e.starts_with("refused"));
        if let Ok(mut u) = shared.upstream.lock() {
            u.connected = false;
            if let Err(e) = &result {
                u.last_error = Some(e.clone());
            }
        }
        if let Err(e) = &result {
            tracing::warn!(%upstream, error = %e, "replication link down");
        }
        if refused {
            // A refusal (divergence, a released position) does not mend by
            // retrying: an operator decides.
            return;
        }
        for _ in 0..5 {
            if shared.stopping() {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn follow_once(shared: &Arc<Shared>, upstream: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let e = |e: std::io::Error| e.to_string();
    let command = format!(
        "*1\r\n${}\r\n{}\r\n",
        STREAM_COMMAND.len(),
        String::from_utf8_lossy(STREAM_COMMAND)
    );
    stream.write_all(command.as_bytes()).await.map_err(e)?;
    let mut input = BytesMut::new();
    // `+STREAM\r\n`, or an error line.
    while !input.windows(2).any(|w| w == b"\r\n") {
        let len = input.len();
        input.resize(len + 256, 0);
        let n = loop {
            match stream.read(&mut input[len..]).await {
                Ok(n) => break n,
                Err(x) if x.kind() == std::io::ErrorKind::TimedOut => {
                    if shared.stopping() {
                        return Ok(());
                    }
                }
                Err(x) => return Err(x.to_string()),
            }
        };
        input.truncate(len + n);
        if n == 0 || input.len() > 1024 {
            return Err("upstream closed before answering".into());
        }
    }
    let end = input.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
    let line = input.split_to(end + 2);
    if &line[..] != b"+STREAM\r\n" {
        return Err(format!(
            "upstream answered {:?}",
            String::from_utf8_lossy(&line).trim()
        ));
    }
    let stats = shared.engine.stats().await.map_err(|x| x.to_string())?;
    let mut hellos = Vec::new();
    for s in &stats {
        let hello = Hello {
            cluster_id: [0; 16],
            shard_count: stats.len() as u32,
            lsn: s.next_lsn,
            chain: s.chain,
            history: vec![(s.epoch, 0)],
            node_id: shared.node_id.clone(),
        };
        hellos.extend(frame(
            FrameKind::Hello,
            s.shard,
            s.epoch,
            0,
            &hello.encode(),
        ));
    }
    stream.write_all(&hellos).await.map_err(e)?;
    if let Ok(mut u) = shared.upstream.lock() {
        u.connected = true;
        u.last_error = None;
    }
    tracing::info!(%upstream, "following upstream");
    loop {
        let Some((kind, shard, _epoch, start, payload)) =
            next_frame(&mut stream, &mut input, shared)
                .await
                .map_err(e)?
        else {
            return if shared.stopping() {
                Ok(())
            } else {
                Err("upstream closed".into())
            };
        };
        if let Ok(mut u) = shared.upstream.lock() {
            u.last_frame = Some(Instant::now());
        }
        match kind {
            FrameKind::Records => {
                let end = start + payload.len() as u64;
                if let Err(x) = shared
                    .engine
                    .replicate_at(shard, payload, CommitLevel::Local)
                    .await
                {
                    let why = format!(
                        "shard {shard}: records at lsn {start} do not continue this log: {x}"
                    );
                    let _ = stream
                        .write_all(&frame(FrameKind::Refuse, shard, 0, 0, why.as_bytes()))
                        .await;
                    return Err(format!("refused: {why}"));
                }
                let ack = Ack {
                    written: end.into(),
                    flushed: end.into(),
                    applied: end.into(),
                };
                stream
                    .write_all(&frame(FrameKind::Ack, shard, 0, 0, ack.as_bytes()))
                    .await
                    .map_err(e)?;
            }
            FrameKind::Refuse => {
                return Err(format!(
                    "refused by upstream: {}",
                    String::from_utf8_lossy(&payload)
                ));
            }
            other => return Err(format!("unexpected {other:?} frame from upstream")),
        }
    }
}

/// Sets its flag when dropped: the task holding it has ended.
struct DoneOnDrop(std::rc::Rc<std::cell::Cell<bool>>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

/// Records on the status page that a downstream was refused, and why.
fn refused(shared: &Shared, key: &str, host: &str, why: &str) {
    let key = if key.is_empty() { host } else { key };
    if let Ok(mut d) = shared.downstreams.lock() {
        let entry = d.entry(key.to_string()).or_insert_with(|| Downstream {
            host: host.to_string(),
            node_id: key.to_string(),
            connected: false,
            sent: Vec::new(),
            flushed: Vec::new(),
            last_ack: None,
            behind_since: None,
            refused: None,
        });
        entry.refused = Some(why.to_string());
    }
}

/// How many connected replicas have made durable every record at or below
/// `written` (shard → LSN of a record).
pub(super) fn replicas_having(shared: &Shared, written: &BTreeMap<u32, u64>) -> usize {
    let Ok(downstreams) = shared.downstreams.lock() else {
        return 0;
    };
    downstreams
        .values()
        .filter(|d| d.connected && d.refused.is_none())
        .filter(|d| {
            written
                .iter()
                .all(|(shard, lsn)| d.flushed.get(*shard as usize).is_some_and(|f| f > lsn))
        })
        .count()
}

/// The `ROLE` reply, in Redis's shape: a primary lists its replicas
/// `[host, port, acked offset]`; a replica names its primary and link state.
pub(super) fn role(shared: &Shared, offset: u64) -> crate::server::resp::Reply {
    use crate::server::resp::Reply;
    if shared.is_replica() {
        let upstream = &shared.config.replica_of;
        let (host, port) = upstream.rsplit_once(':').unwrap_or((upstream, "0"));
        let connected = shared.upstream.lock().map(|u| u.connected).unwrap_or(false);
        return Reply::Array(vec![
            Reply::bulk("slave"),
            Reply::Bulk(Bytes::copy_from_slice(host.as_bytes())),
            Reply::Int(port.parse().unwrap_or(0)),
            Reply::bulk(if connected { "connected" } else { "connect" }),
            Reply::Int(offset as i64),
        ]);
    }
    let replicas = shared
        .downstreams
        .lock()
        .map(|d| {
            d.values()
                .filter(|d| d.connected)
                .map(|d| {
                    let (host, port) = d.host.rsplit_once(':').unwrap_or((&d.host, "0"));
                    Reply::Array(vec![
                        Reply::Bulk(Bytes::copy_from_slice(host.as_bytes())),
                        Reply::Bulk(Bytes::copy_from_slice(port.as_bytes())),
                        Reply::Bulk(Bytes::from(d.flushed.iter().sum::<u64>().to_string())),
                    ])
                })
                .collect()
        })
        .unwrap_or_default();
    Reply::Array(vec![
        Reply::bulk("master"),
        Reply::Int(offset as i64),
        Reply::Array(replicas),
    ])
}
