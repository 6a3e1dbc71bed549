//! WAL streaming between nodes, over the client port.
//!
//! A downstream (a replica) connects to its upstream's client port and
//! sends `TIDEWAL.STREAM`; the upstream answers `+STREAM <cluster id>` and
//! the connection carries replication frames (`crate::format::frame`) from
//! then on. The downstream sends one `Hello` per shard with where its log
//! ends (`lsn`, `chain`, epoch); the upstream streams each shard's durable
//! records from there as they become durable, as `Records` frames holding
//! the bytes exactly as on its disk, plus `Heartbeat`s; the downstream
//! checks that they continue its log, stages the same bytes, applies them,
//! and answers with `Ack`s of what is durable. A position already released
//! (or a `Resync` request) gets the upstream's newest snapshot first. A
//! position the upstream cannot continue (a different chain at that LSN, a
//! log ahead of the upstream's, another cluster, a later epoch) gets a
//! `Refuse` naming why, and the downstream stops and reports it rather than
//! truncating anything; an operator may re-sync it: where the epoch
//! histories locate the fork, it is told to `Rewind` there (the suffix kept
//! aside, only what follows streamed again), else it gets a snapshot.
//!
//! Writes that wait for replicas (`replicated(k)`, `all`, `applied(k)`)
//! are in `commit.rs`; the acks read here wake them. ARCHITECTURE.md walks
//! through both sides.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use zerocopy::IntoBytes;

use super::Shared;
use crate::engine::CommitLevel;
use crate::format::{
    Ack, Expect, FrameKind, Heartbeat, Hello, decode_fixed, decode_frame, encode_frame,
    frame_header,
};

/// Largest frame payload either side accepts.
const PAYLOAD_MAX: usize = 4 << 20;
/// Bytes asked of the stream per read.
const READ_BYTES: usize = 64 << 10;
/// Bytes of records one `Records` frame carries, about. Also what the
/// sender reads from the segments at once when a downstream is behind the
/// recent batches: 1 MiB (eight chunks in flight) let a replica keep up
/// with a primary writing 64 KiB values under load, where 256 KiB did not.
const BATCH_BYTES: usize = 1 << 20;
/// The command that turns a client connection into a replication stream.
pub(super) const STREAM_COMMAND: &[u8] = b"TIDEWAL.STREAM";

/// What the upstream knows of one downstream, for the status page.
#[derive(Debug, Clone, Default)]
pub(super) struct Downstream {
    /// The address its stream comes from.
    pub host: String,
    /// Its client port, as its Hellos said (`start_lsn`; 0: not said):
    /// with `host`'s IP, where clients reach it (`ROLE`, `SENTINEL`).
    pub port: u16,
    /// It is a warm standby (serves no reads), as its Hellos said: not
    /// offered to Sentinel clients as a replica to read from.
    pub standby: bool,
    pub node_id: String,
    pub connected: bool,
    /// The highest epoch the downstream has said it is in.
    pub epoch: u64,
    /// Per shard: the epoch of its last ack (acks of a shard never go back).
    pub ack_epochs: Vec<u64>,
    /// Per shard: its position was checked against this node's log (a
    /// batch read from there, a snapshot sent, or its chain equal to this
    /// node's at the head). Until then it holds nothing as far as commit
    /// levels and `WAIT` go.
    pub verified: Vec<bool>,
    /// Which connection this entry is for (a newer one replaces it).
    pub link: u64,
    /// Per shard: next LSN to send, and the LSNs below which the downstream
    /// reported its log written (staged), durable, and applied.
    pub sent: Vec<u64>,
    pub written: Vec<u64>,
    pub flushed: Vec<u64>,
    pub applied: Vec<u64>,
    /// Per shard: the end LSN of each batch sent and not yet acknowledged
    /// durable, and when it was sent (what `lag_seconds` is measured from).
    pub unacked: Vec<VecDeque<(u64, Instant)>>,
    pub last_ack: Option<Instant>,
    /// Since when the sender has had more to read for it than one batch
    /// (catching up); `None` once a batch reached the head.
    pub behind_since: Option<Instant>,
    pub refused: Option<String>,
    /// Whether its acknowledgements count toward `replicated(k)`,
    /// `applied(k)` and `WAIT`: with failover peers, only a peer's do
    /// (`failover::counts_for_commit`).
    pub counts: bool,
    /// Whether its lag alert is raised (see `LagAlert`).
    pub alert: bool,
    /// A snapshot is being sent to it.
    pub resyncing: bool,
    /// Snapshots sent to it since this node started.
    pub resyncs: u64,
    /// What it last reported of its own downstreams (cascading).
    pub cascaded: Option<serde_json::Value>,
    /// Where it diverged: shard, `from_lsn` (where the epoch histories
    /// part; null when they do not tell), `detected_at_lsn`, `to_lsn` (its
    /// end).
    pub diverged: Option<serde_json::Value>,
    /// Notes of `(when, sum of flushed, sum of this node's durable head)`
    /// taken as status pages are read: their rates estimate
    /// `catch_up_seconds`.
    pub progress: VecDeque<Progress>,
}

/// A note for `catch_up_seconds`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Progress {
    at: Instant,
    flushed: u64,
    head: u64,
}

/// How far back `catch_up_seconds` looks, and how often it takes a note.
const PROGRESS_WINDOW: Duration = Duration::from_secs(300);
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

impl Downstream {
    /// Estimated seconds until the downstream has caught up, `lag` bytes
    /// behind this node's durable `head` (summed over shards), from the
    /// rates since the newest note at least a second old (notes are taken
    /// when the status page is read, at most one a second, kept
    /// [`PROGRESS_WINDOW`]). Catching up (`sent_all` false), the lag
    /// closes at the rate it makes records durable less the rate this
    /// node writes them: `None` unless that is positive. Streaming (sent
    /// everything, acks on the way), what is in flight takes the lag at
    /// its rate of making records durable. 0 when caught up; `None` with no
    /// such note.
    pub fn catch_up_seconds(&mut self, lag: u64, head: u64, sent_all: bool) -> Option<f64> {
        self.catch_up_seconds_at(Instant::now(), lag, head, sent_all)
    }

    fn catch_up_seconds_at(
        &mut self,
        now: Instant,
        lag: u64,
        head: u64,
        sent_all: bool,
    ) -> Option<f64> {
        let flushed: u64 = self.flushed.iter().sum();
        // Positions forgotten, or this node's log cut (a rewind or install
        // here): start again.
        if self
            .progress
            .back()
            .is_some_and(|p| p.flushed > flushed || p.head > head)
        {
            self.progress.clear();
        }
        while self
            .progress
            .front()
            .is_some_and(|p| now.duration_since(p.at) > PROGRESS_WINDOW)
        {
            self.progress.pop_front();
        }
        if self
            .progress
            .back()
            .is_none_or(|p| now.duration_since(p.at) >= PROGRESS_EVERY)
        {
            self.progress.push_back(Progress {
                at: now,
                flushed,
                head,
            });
        }
        if lag == 0 {
            return Some(0.0);
        }
        // The most recent rates: from the newest note at least a second old.
        let then = *self
            .progress
            .iter()
            .rev()
            .find(|p| now.duration_since(p.at) >= Duration::from_secs(1))?;
        let seconds = now.duration_since(then.at).as_secs_f64();
        let durable_rate = (flushed - then.flushed) as f64 / seconds;
        let closing = if sent_all {
            durable_rate
        } else {
            durable_rate - (head - then.head) as f64 / seconds
        };
        (closing > 0.0).then(|| lag as f64 / closing)
    }

    /// Seconds since the oldest batch the downstream has not yet made
    /// durable was sent (0 when it has everything it was sent).
    pub fn unacked_seconds(&self) -> f64 {
        self.unacked
            .iter()
            .filter_map(|q| q.front())
            .map(|(_, t)| t.elapsed().as_secs_f64())
            .fold(0.0, f64::max)
    }
}

/// Downstreams remembered (connected or not) at most.
const DOWNSTREAMS_MAX: usize = 256;

/// Numbers the replication links this process serves.
static NEXT_LINK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A replica drops a link on which nothing (not even a heartbeat) arrived
/// for this long: the upstream is gone, or the link is half open.
const SILENCE_MAX: Duration = Duration::from_secs(3);

/// Batches remembered per shard for `lag_seconds`; older ones are merged.
const UNACKED_MAX: usize = 4096;

/// What a downstream knows of its link to the upstream.
#[derive(Debug, Clone, Default)]
pub(super) struct Upstream {
    pub connected: bool,
    pub last_error: Option<String>,
    pub last_frame: Option<Instant>,
    /// How long the upstream had heard no primary at its last heartbeat
    /// (zero from a primary): a cascaded replica hears the primary only
    /// through its upstream.
    pub upstream_silence: Duration,
    /// Per shard: the upstream's durable LSN as last heard (heartbeats and
    /// records), and this node's applied LSN.
    pub head: Vec<u64>,
    pub applied: Vec<u64>,
    /// Per shard: the highest epoch seen from the upstream; a frame of a
    /// lower one is refused.
    pub epoch: Vec<u64>,
    /// Since when this node has been behind the upstream's last heard head.
    pub behind_since: Option<Instant>,
    /// The upstream's clock minus this node's at the last heartbeat, in
    /// microseconds (for the status page; lag is not measured across clocks).
    pub clock_skew_micros: i64,
    /// Shards re-synced from an upstream snapshot since this node started.
    pub resyncs: u64,
    /// Shards rewound to where their log parted from the upstream's.
    pub rewinds: u64,
}

/// Where a replica writes the pieces of a snapshot it receives, in the
/// shard's directory.
const INCOMING_SNAPSHOT: &str = "resync-incoming";

/// How often the upstream tells each downstream its head and clock.
pub(super) const HEARTBEAT: Duration = Duration::from_millis(500);

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
        // Room for the rest of the frame and one more read, once its header
        // says how long it is. Grown a read at a time, a buffer still
        // shared with the frames before it (the engine holds their payloads
        // while it applies them) was copied into a new one whenever it
        // filled: a 256 MiB catch-up copied 263 MB that way.
        let rest = crate::format::frame_len(input).map_or(0, |n| n.saturating_sub(len));
        input.reserve(rest + READ_BYTES);
        input.resize(len + READ_BYTES, 0);
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

pub(super) fn frame(
    kind: FrameKind,
    shard: u32,
    epoch: u64,
    start: u64,
    payload: &[u8],
) -> Vec<u8> {
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
    // Positions this link learns are of the log as it is now: a rewind or
    // install here ends it (see `forget_downstream_positions`).
    let generation = shared.swap_generation.load(Ordering::Acquire);
    let swapped = || shared.swap_generation.load(Ordering::Acquire) != generation;
    let result = async {
        let shard_count = shared.engine.shard_count();
        // One Hello per shard, first, within a few seconds: a downstream
        // with another shard count sends too many or too few.
        let mut hellos: BTreeMap<u32, Hello> = BTreeMap::new();
        // Shards whose downstream asked to be re-synced, and whether only a
        // snapshot will do (else a rewind to where the logs part may).
        let mut resync: BTreeMap<u32, bool> = BTreeMap::new();
        // The downstream's client port, which its Hellos carry.
        let mut client_port = 0u16;
        let mut standby = false;
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
                Ok(Ok(Some((FrameKind::Resync, shard, _, start, _)))) if shard < shard_count => {
                    // Snapshot only, unless the downstream says it can be
                    // rewound (one that predates Rewind frames sends 0).
                    resync.insert(shard, !crate::format::resync_may_rewind(start));
                    None
                }
                Ok(Ok(Some((kind, shard, _, start, payload)))) => {
                    let hello = match kind {
                        FrameKind::Hello => Some(Hello::decode(&payload).map_err(io_err)?),
                        _ => None,
                    };
                    if hello.is_some() {
                        client_port = (start & HELLO_PORT_MASK) as u16;
                        standby = start & HELLO_STANDBY != 0;
                    }
                    let ours = shared.cluster();
                    match hello {
                        Some(h) if h.cluster_id != [0; 16] && ours != [0; 16] && h.cluster_id != ours => {
                            Some(format!(
                                "the downstream belongs to cluster {:032x}, this node to {:032x}: another cluster",
                                u128::from_be_bytes(h.cluster_id),
                                u128::from_be_bytes(ours)
                            ))
                        }
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
        let mut epoch = 0;
        let mut snapshots = Vec::new();
        let mut verified = Vec::new();
        // Per shard, this node's current epoch: what every frame carries.
        let mut current = Vec::new();
        // Shards to rewind to where the logs part, instead of a snapshot.
        let mut rewinds = Vec::new();
        for (shard, hello) in &hellos {
            let Some(s) = stats.iter().find(|s| s.shard == *shard) else {
                return Err(io_err(format!("shard {shard} is not open here")));
            };
            let theirs = hello.history.last().map_or(0, |(e, _)| *e);
            epoch = epoch.max(theirs);
            // A re-sync where the epoch histories locate the fork inside
            // what this node holds: only the suffix past it is replaced.
            let rewind_to = match resync.get(shard) {
                Some(false) if theirs <= s.epoch => rewind_point(
                    &s.epochs,
                    &hello.history,
                    hello.lsn,
                    s.first_lsn,
                    s.durable_lsn,
                ),
                _ => None,
            };
            if let Some(f) = rewind_to {
                rewinds.push((*shard, f, s.epoch));
                continue;
            }
            // Behind what this node still holds, or asked for: it gets the
            // newest snapshot, then the records after it.
            let wants_snapshot = resync.contains_key(shard) || hello.lsn < s.first_lsn;
            let mut range = None;
            let problem = if theirs > s.epoch {
                Some(format!(
                    "shard {shard}: the downstream is in epoch {theirs}, this node in {}: this node is behind a failover (fenced) and may not serve it",
                    s.epoch
                ))
            } else if wants_snapshot {
                None
            } else if hello.lsn > s.durable_lsn {
                let (why, at) = diverged(*shard, &s.epochs, &hello.history, s.durable_lsn, hello.lsn);
                range = Some(at);
                Some(format!(
                    "{why}; it holds writes this node never had (its log ends past this node's durable {})",
                    s.durable_lsn
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
                if let Some(range) = range {
                    set_diverged(&shared, &node_id, &host, range);
                }
                writer.write_all(&frame(FrameKind::Refuse, *shard, s.epoch, 0, why.as_bytes())).await?;
                return Err(io_err(why));
            }
            if wants_snapshot {
                snapshots.push(*shard);
            }
            verified.push(!wants_snapshot && hello.lsn == s.next_lsn && hello.chain == s.chain);
            // The fence this node's frames carry: the highest epoch it has
            // held or seen, so a cascaded downstream keeps it too.
            current.push(Cell::new(s.epoch.max(s.epoch_floor)));
            pos.push(Expect {
                lsn: hello.lsn,
                chain: hello.chain,
                epoch: theirs,
            });
        }
        if !rewinds.is_empty() {
            // It rewinds, then says Hello again from the fork; the shards
            // still to re-sync by snapshot are asked for again then.
            for (shard, f, epoch) in rewinds {
                tracing::info!(downstream = %node_id, shard, lsn = f, "telling the downstream to rewind to where the logs part");
                writer.write_all(&frame(FrameKind::Rewind, shard, epoch, f, &[])).await?;
            }
            writer.flush().await?;
            return Ok(());
        }
        let at: Vec<u64> = pos.iter().map(|p| p.lsn).collect();
        let status = Downstream {
            host: host.clone(),
            port: client_port,
            standby,
            node_id: node_id.clone(),
            connected: true,
            epoch,
            sent: at.clone(),
            written: at.clone(),
            flushed: at.clone(),
            applied: at,
            unacked: vec![VecDeque::new(); pos.len()],
            ack_epochs: vec![0; pos.len()],
            verified,
            link: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
            ..Downstream::default()
        };
        let link = status.link;
        let current = Rc::new(current);
        let key = if node_id.is_empty() { host.clone() } else { node_id.clone() };
        if let Ok(mut d) = shared.downstreams.lock() {
            // Bounded: the oldest disconnected entries go first.
            while d.len() >= DOWNSTREAMS_MAX {
                let oldest = d
                    .iter()
                    .filter(|(_, x)| !x.connected)
                    .min_by_key(|(_, x)| x.link)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => {
                        d.remove(&k);
                    }
                    None => break,
                }
            }
            if swapped() {
                return Err(io_err("a shard was re-synced here while the downstream said Hello"));
            }
            let mut status = status;
            // Under the lock, so a change of peers (`failover::recount`) is
            // not missed in between.
            status.counts = super::failover::counts_for_commit(&shared, &node_id);
            d.insert(key.clone(), status);
        }
        tracing::info!(downstream = %key, "replica attached");
        for shard in snapshots {
            set_resyncing(&shared, &key, true);
            let epoch = current[shard as usize].get();
            let sent = send_snapshot(&shared, shard, epoch, &mut writer, false).await;
            set_resyncing(&shared, &key, false);
            match sent {
                Ok(at) => {
                    let i = shard as usize;
                    pos[i] = at;
                    if let Ok(mut d) = shared.downstreams.lock()
                        && !swapped()
                        && let Some(d) = d.get_mut(&key)
                    {
                        // Its log continues from the snapshot's position
                        // once it has installed it, which its ack says:
                        // until then it holds nothing of ours (whatever its
                        // old log said), and no write counts it.
                        d.sent[i] = at.lsn;
                        d.written[i] = 0;
                        d.flushed[i] = 0;
                        d.applied[i] = 0;
                        d.verified[i] = true;
                        d.resyncs += 1;
                    }
                }
                Err(why) => {
                    refused(&shared, &key, &host, &why);
                    let _ = writer
                        .write_all(&frame(FrameKind::Refuse, shard, 0, 0, why.as_bytes()))
                        .await;
                    return Err(io_err(why));
                }
            }
        }
        // Acks come back on a task of their own; each shard's records are
        // read by a task of their own (waiting for new ones as they become
        // durable); this task writes what they produce, in order.
        let done = Rc::new(Cell::new(false));
        let _acks = {
            let (shared, key, done) = (shared.clone(), key.clone(), done.clone());
            let _done = DoneOnDrop(done.clone());
            glommio::spawn_local(async move {
                let _done = _done;
                read_acks(&shared, &key, link, &mut reader, &mut input).await;
                // The downstream hung up (or broke the protocol): it is
                // disconnected now, whatever the sending side is doing.
                if let Ok(mut d) = shared.downstreams.lock()
                    && let Some(d) = d.get_mut(&key)
                    && d.link == link
                {
                    d.connected = false;
                }
                shared.ack_signal.notify(&shared);
            })
        };
        let (tx, rx) = glommio::channels::local_channel::new_bounded::<Out>(2 * pos.len() + 2);
        let tx = Rc::new(tx);
        let mut readers = Vec::new();
        for (shard, from) in pos.iter().enumerate() {
            readers.push(glommio::spawn_local(read_shard(
                shared.clone(),
                shard as u32,
                *from,
                tx.clone(),
                done.clone(),
                current.clone(),
                hellos
                    .get(&(shard as u32))
                    .map(|h| h.history.clone())
                    .unwrap_or_default(),
            )));
        }
        readers.push(glommio::spawn_local(heartbeats(
            shared.clone(),
            tx,
            done.clone(),
            current.clone(),
        )));
        let mut next = rx.recv().await;
        while let Some(out) = next {
            if shared.stopping() || done.get() {
                break;
            }
            match out {
                Out::Records { shard, epoch, start, next, bytes, more } => {
                    let header = frame_header(FrameKind::Records, shard, epoch, start, &bytes);
                    if swapped() {
                        // Maybe read from the log as it was: this link
                        // ends (the downstream says Hello again, and is
                        // checked against the log as it is now).
                        break;
                    }
                    writer.write_all(header.as_bytes()).await?;
                    writer.write_all(&bytes).await?;
                    if let Ok(mut d) = shared.downstreams.lock()
                        && !swapped()
                        && let Some(d) = d.get_mut(&key)
                    {
                        let i = shard as usize;
                        // Read from its position: the chain matched there.
                        d.verified[i] = true;
                        d.sent[i] = next.lsn;
                        let q = &mut d.unacked[i];
                        if q.len() >= UNACKED_MAX {
                            // Merge the two newest: the oldest send time,
                            // which lag is measured from, stays.
                            q.pop_back();
                        }
                        q.push_back((next.lsn, Instant::now()));
                        // A full batch: there is more to read, it is
                        // catching up; less: it has reached the head.
                        match (more, d.behind_since) {
                            (true, None) => d.behind_since = Some(Instant::now()),
                            (false, _) => d.behind_since = None,
                            _ => {}
                        }
                    }
                }
                Out::Beat {
                    shard,
                    epoch,
                    beat,
                    silence_ms,
                } => {
                    writer
                        .write_all(&frame(
                            FrameKind::Heartbeat,
                            shard,
                            epoch,
                            silence_ms,
                            beat.as_bytes(),
                        ))
                        .await?;
                }
                Out::Released { why } => {
                    tracing::info!(downstream = %key, %why, "ending the stream for a re-sync");
                    return Err(io_err(why));
                }
                Out::Failed { shard, why, range } => {
                    refused(&shared, &key, &host, &why);
                    if let Some(range) = range {
                        set_diverged(&shared, &key, &host, range);
                    }
                    writer.write_all(&frame(FrameKind::Refuse, shard, 0, 0, why.as_bytes())).await?;
                    writer.flush().await?;
                    return Err(io_err(why));
                }
            }
            // Flush only when nothing more is ready: frames that are ready
            // together go out in one write.
            next = match futures_lite::future::poll_once(rx.recv()).await {
                Some(next) => next,
                None => {
                    writer.flush().await?;
                    rx.recv().await
                }
            };
        }
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
    shared.ack_signal.notify(&shared);
    let _ = writer.close().await;
}

fn set_resyncing(shared: &Shared, key: &str, on: bool) {
    if let Ok(mut d) = shared.downstreams.lock()
        && let Some(d) = d.get_mut(key)
    {
        d.resyncing = on;
    }
}

/// After this node's `shard` was rewound or replaced by a snapshot: what
/// its downstreams were known to hold of that shard was of the old log.
/// None counts for a write until its link reads on from its position,
/// which happens only where the chain matches the new log there (and so
/// the downstream holds the new log up to it), and its acks come back.
fn forget_downstream_positions(shared: &Shared, shard: u32) {
    if let Ok(mut all) = shared.downstreams.lock() {
        // Under the lock: a link that updates its entry after this sees
        // the new generation and ends instead (a batch it read from the old
        // log may still be on its way out).
        shared.swap_generation.fetch_add(1, Ordering::AcqRel);
        forget_positions(&mut all, shard);
    }
}

pub(super) fn forget_positions(all: &mut BTreeMap<String, Downstream>, shard: u32) {
    let i = shard as usize;
    for d in all.values_mut().filter(|d| i < d.verified.len()) {
        d.verified[i] = false;
        d.written[i] = 0;
        d.flushed[i] = 0;
        d.applied[i] = 0;
    }
}

/// Bytes of a snapshot file per `Snapshot` frame.
const SNAPSHOT_PIECE: usize = 1 << 20;

/// The newest snapshot file of a shard directory and the position it
/// stands for.
fn newest_snapshot(dir: &std::path::Path) -> Option<(std::path::PathBuf, Expect, u64)> {
    use zerocopy::FromBytes;
    let mut found: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            crate::format::parse_snapshot_file_name(&name).map(|lsn| (lsn, e.path()))
        })
        .collect();
    found.sort_unstable_by_key(|(lsn, _)| std::cmp::Reverse(*lsn));
    for (_, path) in found {
        // The header only, not the file (which may be gigabytes).
        use std::io::Read;
        let mut head = [0u8; size_of::<crate::format::SnapshotHeader>()];
        let read = std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut head));
        if read.is_err() {
            continue;
        }
        let Ok((h, _)) = crate::format::SnapshotHeader::read_from_prefix(&head) else {
            continue;
        };
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        let at = Expect {
            lsn: h.lsn.get(),
            chain: h.chain.get(),
            epoch: h.epoch.get(),
        };
        return Some((path, at, len));
    }
    None
}

/// Sends `shard`'s newest snapshot (taking one first when there is none)
/// as `Snapshot` frames and a `SnapshotEnd`; returns its position, from
/// which records follow.
/// With `end_when_stopping` (a backup), a node that begins to stop ends
/// the sending with an error; a re-sync is not ended so (its downstream
/// would take the error for a refusal), it ends with the process.
pub(super) async fn send_snapshot(
    shared: &Shared,
    shard: u32,
    epoch: u64,
    writer: &mut (impl futures_lite::AsyncWrite + Unpin),
    end_when_stopping: bool,
) -> Result<Expect, String> {
    let dir = shared.engine.shard_dir(shard);
    if newest_snapshot(&dir).is_none() {
        let hold = super::retention_hold(shared, shard);
        shared
            .engine
            .snapshot_shard(shard, hold)
            .await
            .map_err(|e| format!("shard {shard}: taking a snapshot to re-sync from: {e}"))?;
    }
    let (path, at, _) = newest_snapshot(&dir)
        .ok_or_else(|| format!("shard {shard}: no snapshot to re-sync from"))?;
    // Open before reading: a snapshot released meanwhile stays readable.
    let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = Arc::new(file);
    tracing::info!(shard, lsn = at.lsn, file = %path.display(), "sending a snapshot");
    let mut offset = 0u64;
    let e = |x: std::io::Error| x.to_string();
    loop {
        if end_when_stopping && shared.stopping() {
            return Err("the node is stopping".into());
        }
        // Read on glommio's blocking thread: the file is cold (written
        // with O_DIRECT), and the executor serves shards and clients.
        let f = file.clone();
        let (piece, n) = glommio::executor()
            .spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut piece = vec![0u8; SNAPSHOT_PIECE];
                let mut n = 0;
                while n < piece.len() {
                    match f.read_at(&mut piece[n..], offset + n as u64) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(x) if x.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(x) => return Err(x),
                    }
                }
                Ok((piece, n))
            })
            .await
            .map_err(e)?;
        if n == 0 {
            break;
        }
        writer
            .write_all(&frame(
                FrameKind::Snapshot,
                shard,
                epoch.max(at.epoch),
                offset,
                &piece[..n],
            ))
            .await
            .map_err(e)?;
        offset += n as u64;
    }
    let end = crate::format::SnapshotEnd {
        file_bytes: offset.into(),
        lsn: at.lsn.into(),
        epoch: at.epoch.into(),
        chain: at.chain.into(),
        reserved: 0.into(),
    };
    writer
        .write_all(&frame(
            FrameKind::SnapshotEnd,
            shard,
            epoch.max(at.epoch),
            0,
            end.as_bytes(),
        ))
        .await
        .map_err(e)?;
    writer.flush().await.map_err(e)?;
    Ok(at)
}

impl Downstream {
    /// Where clients reach it: its stream's IP and the client port its
    /// Hellos said (its stream's port when they said none, as before).
    pub fn client_address(&self) -> (String, u16) {
        let (ip, port) = self.host.rsplit_once(':').unwrap_or((&self.host, "0"));
        let ip = ip.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = if self.port != 0 {
            self.port
        } else {
            port.parse().unwrap_or(0)
        };
        (ip, port)
    }
}

/// In a Hello's `start_lsn`: the downstream's client port, and the bit
/// that says it is a warm standby.
const HELLO_PORT_MASK: u64 = 0xffff;
pub(super) const REPLICAS_COMMAND: &[u8] = b"TIDEWAL.REPLICAS";
const HELLO_STANDBY: u64 = 1 << 16;

/// `TIDEWAL.REPLICAS`: this node's connected replicas that serve reads,
/// `[[ip, port, offset]...]` as in `ROLE` (which lists warm standbys too):
/// what a Sentinel port offers clients to read from.
pub(super) fn readable_replicas(shared: &Shared) -> crate::server::resp::Reply {
    crate::server::resp::Reply::Array(replica_list(shared, false))
}

/// The connected replicas as `ROLE` lists them, `[ip, port, offset]`
/// each; warm standbys only `with_standbys`.
fn replica_list(shared: &Shared, with_standbys: bool) -> Vec<crate::server::resp::Reply> {
    use crate::server::resp::Reply;
    shared
        .downstreams
        .lock()
        .map(|d| {
            d.values()
                .filter(|d| d.connected && (with_standbys || !d.standby))
                .map(|d| {
                    let (host, port) = d.client_address();
                    Reply::Array(vec![
                        Reply::Bulk(Bytes::from(host)),
                        Reply::Bulk(Bytes::from(port.to_string())),
                        Reply::Bulk(Bytes::from(d.flushed.iter().sum::<u64>().to_string())),
                    ])
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What the per-shard readers hand the task writing the stream.
enum Out {
    Records {
        shard: u32,
        epoch: u64,
        start: u64,
        next: Expect,
        bytes: Bytes,
        /// The batch was full: more records wait to be read.
        more: bool,
    },
    Beat {
        shard: u32,
        epoch: u64,
        beat: Heartbeat,
        /// Milliseconds since this node last heard a primary (the frame's
        /// `start_lsn`).
        silence_ms: u64,
    },
    /// The downstream's position does not continue this log (and where,
    /// as far as the epoch histories tell).
    Failed {
        shard: u32,
        why: String,
        range: Option<serde_json::Value>,
    },
    /// The downstream's position was released: end the stream (it
    /// reconnects and is re-synced), without refusing it.
    Released { why: String },
}

/// Reads `shard`'s durable records from `pos` on, as they become durable,
/// until `done`.
async fn read_shard(
    shared: Arc<Shared>,
    shard: u32,
    mut pos: Expect,
    tx: Rc<glommio::channels::local_channel::LocalSender<Out>>,
    done: Rc<Cell<bool>>,
    current: Rc<Vec<Cell<u64>>>,
    // The downstream's epoch history, to locate a divergence.
    theirs: Vec<(u64, u64)>,
) {
    let end = pos.lsn;
    let epoch = &current[shard as usize];
    while !done.get() && !shared.stopping() {
        let read = shared
            .engine
            .read_log_wait(shard, pos, BATCH_BYTES, Duration::from_millis(100))
            .await;
        let out = match read {
            Err(e) => {
                // Released under it (this node was itself re-synced, or
                // retention gave up on it): not a divergence; it reconnects
                // and gets a snapshot.
                let stats = shared.engine.stats().await.unwrap_or_default();
                let ours = stats.iter().find(|s| s.shard == shard);
                let first = ours.map_or(0, |s| s.first_lsn);
                if pos.lsn < first {
                    Out::Released {
                        why: format!(
                            "shard {shard}: lsn {} was released here (the log starts at {first}); the downstream reconnects for a snapshot",
                            pos.lsn
                        ),
                    }
                } else {
                    let ours = ours.map(|s| s.epochs.clone()).unwrap_or_default();
                    let (why, range) = diverged(shard, &ours, &theirs, pos.lsn, end);
                    Out::Failed {
                        shard,
                        why: format!("{why}: {e}"),
                        range: Some(range),
                    }
                }
            }
            Ok(batch) => {
                let Some(last) = batch.records.last() else {
                    continue;
                };
                // The frame carries this node's current epoch (the fence),
                // not that of its records, which may be older.
                epoch.set(epoch.get().max(last.epoch));
                let out = Out::Records {
                    shard,
                    epoch: epoch.get(),
                    start: pos.lsn,
                    next: batch.next,
                    more: batch.encoded.len() >= BATCH_BYTES,
                    bytes: batch.encoded,
                };
                pos = batch.next;
                out
            }
        };
        let failed = matches!(out, Out::Failed { .. } | Out::Released { .. });
        if tx.send(out).await.is_err() || failed {
            return;
        }
    }
}

/// Every [`HEARTBEAT`]: each shard's head, durable LSN and this node's
/// clock, so downstreams know how far behind they are even when idle, and
/// how long this node has heard no primary, so a cascaded replica knows
/// whether the primary is up (`failover::primary_silence_ms`).
async fn heartbeats(
    shared: Arc<Shared>,
    tx: Rc<glommio::channels::local_channel::LocalSender<Out>>,
    done: Rc<Cell<bool>>,
    current: Rc<Vec<Cell<u64>>>,
) {
    while !done.get() && !shared.stopping() {
        let Ok(stats) = shared.engine.stats().await else {
            return;
        };
        for s in &stats {
            if let Some(c) = current.get(s.shard as usize) {
                c.set(c.get().max(s.epoch.max(s.epoch_floor)));
            }
        }
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let silence_ms = super::failover::primary_silence_ms(&shared);
        for s in stats {
            let beat = Heartbeat {
                head_lsn: s.next_lsn.into(),
                durable_lsn: s.durable_lsn.into(),
                unix_micros: micros.into(),
            };
            let out = Out::Beat {
                shard: s.shard,
                epoch: current.get(s.shard as usize).map_or(s.epoch, Cell::get),
                beat,
                silence_ms,
            };
            if tx.send(out).await.is_err() {
                return;
            }
        }
        glommio::timer::sleep(HEARTBEAT).await;
    }
}

/// Reads a downstream's acks until it leaves: records what it has
/// written, made durable and applied, and wakes writes waiting for it.
async fn read_acks(
    shared: &Shared,
    key: &str,
    link: u64,
    reader: &mut (impl futures_lite::AsyncRead + Unpin),
    input: &mut BytesMut,
) {
    while let Ok(Some((kind, shard, epoch, _, payload))) = next_frame(reader, input, shared).await {
        match kind {
            FrameKind::Ack => {
                let Ok(ack) = decode_fixed::<Ack>(kind, &payload) else {
                    return;
                };
                let Ok(mut all) = shared.downstreams.lock() else {
                    return;
                };
                let Some(d) = all.get_mut(key).filter(|d| d.link == link) else {
                    return;
                };
                let i = shard as usize;
                if i >= d.flushed.len() {
                    return;
                }
                if epoch < d.ack_epochs[i] {
                    tracing::warn!(downstream = %key, shard, epoch, seen = d.ack_epochs[i],
                        "an ack from an older epoch; dropping the stream");
                    return;
                }
                d.ack_epochs[i] = epoch;
                d.epoch = d.epoch.max(epoch);
                // Never more than was sent: an ack cannot vouch for records
                // this link did not carry.
                let sent = d.sent[i];
                d.written[i] = d.written[i].max(ack.written.get().min(sent));
                d.flushed[i] = d.flushed[i].max(ack.flushed.get().min(sent));
                d.applied[i] = d.applied[i].max(ack.applied.get().min(sent));
                let flushed = d.flushed[i];
                while d.unacked[i].front().is_some_and(|(end, _)| *end <= flushed) {
                    d.unacked[i].pop_front();
                }
                d.last_ack = Some(Instant::now());
                drop(all);
                shared.ack_signal.notify(shared);
                super::commit::maybe_recover(shared);
            }
            FrameKind::Report => {
                let Ok(report) = serde_json::from_slice::<serde_json::Value>(&payload) else {
                    return;
                };
                // Only an array of objects is kept: the status page adds
                // fields to each.
                let well_formed = report
                    .as_array()
                    .is_some_and(|a| a.len() <= DOWNSTREAMS_MAX && a.iter().all(|x| x.is_object()));
                if !well_formed {
                    return;
                }
                if let Ok(mut d) = shared.downstreams.lock()
                    && let Some(d) = d.get_mut(key)
                {
                    d.cascaded = Some(report);
                }
            }
            FrameKind::Refuse => {
                let why = String::from_utf8_lossy(&payload).to_string();
                tracing::warn!(downstream = %key, %why, "replica refused the stream");
                if let Ok(mut d) = shared.downstreams.lock()
                    && let Some(d) = d.get_mut(key)
                {
                    d.refused = Some(why);
                }
                return;
            }
            _ => return,
        }
    }
}

/// The downstream side: follows `upstream` until the node stops,
/// reconnecting after a broken link; stops for good when refused.
pub(super) async fn follow(shared: Arc<Shared>, upstream: String, generation: u64) {
    let current = |shared: &Shared| {
        !shared.stopping() && shared.follow_generation.load(Ordering::Acquire) == generation
    };
    let mut plan = ResyncPlan::default();
    while current(&shared) {
        let result = follow_once(&shared, &upstream, generation, &mut plan).await;
        if !current(&shared) {
            return;
        }
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
            // A refusal (divergence, a released position, a stale
            // upstream) does not mend by retrying: an operator decides,
            // unless this node follows a primary elected in a failover
            // (it is an old primary, or a replica that took records the
            // winner never had): then it re-syncs by itself, once.
            if super::failover::resync_after_refusal(&shared, &upstream).await {
                tracing::warn!(%upstream, "refused by the elected primary: re-syncing from it");
                let _ = shared.resync();
            }
            return;
        }
        for _ in 0..5 {
            if !current(&shared) {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What a replica still has to re-sync, across the links of one follower.
#[derive(Debug, Default)]
struct ResyncPlan {
    /// Shards an operator asked to re-sync that are not yet done.
    pending: std::collections::BTreeSet<u32>,
    /// Of those, the shards a rewind could not serve: a snapshot only.
    snapshot_only: std::collections::BTreeSet<u32>,
}

async fn follow_once(
    shared: &Arc<Shared>,
    upstream: &str,
    generation: u64,
    plan: &mut ResyncPlan,
) -> Result<(), String> {
    // A node that voted in an epoch follows no upstream of an older one:
    // its acks (and Hello) could otherwise acknowledge, for an old primary,
    // writes the winner of that vote never gathered (after a restart, say).
    super::failover::may_follow(shared, upstream).await?;
    let mut stream = super::connect(upstream)
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
    let answer = String::from_utf8_lossy(&line[..end]).to_string();
    let Some(rest) = answer.strip_prefix("+STREAM") else {
        return Err(format!("upstream answered {:?}", answer.trim()));
    };
    let theirs = u128::from_str_radix(rest.trim(), 16)
        .map(u128::to_be_bytes)
        .map_err(|_| format!("upstream answered {:?}: no cluster id", answer.trim()))?;
    let resync = shared.resync_requested.load(Ordering::Acquire) || !plan.pending.is_empty();
    let ours = shared.cluster();
    // A node that holds no record yet (a fresh primary pointed elsewhere by
    // REPLICAOF) has nothing to lose by joining.
    let empty = shared
        .engine
        .stats()
        .await
        .is_ok_and(|s| s.iter().all(|s| s.next_lsn == 0));
    if ours == [0; 16] || resync || empty {
        // Joining (or re-syncing from scratch): this node belongs to the
        // upstream's cluster from now on.
        if ours != theirs && theirs != [0; 16] {
            shared.set_cluster(theirs);
        }
    } else if ours != theirs && theirs != [0; 16] {
        return Err(format!(
            "refused: the upstream belongs to cluster {:032x}, this node to {:032x}: it is another cluster's node (re-sync on command to join it)",
            u128::from_be_bytes(theirs),
            u128::from_be_bytes(ours)
        ));
    }
    // Records a previous link handed the engine may still be on their way
    // into the log: an empty batch per shard queues behind them (staging is
    // first come, first served), so the position read next is where the
    // log really ends.
    for shard in 0..shared.engine.shard_count() {
        shared
            .engine
            .replicate_at(shard, Bytes::new(), CommitLevel::Memory)
            .await
            .map_err(|x| x.to_string())?;
    }
    // ... and durable: the upstream counts the position a Hello gives as
    // held here (`replicated(k)`, `WAIT`), so records only staged must not
    // be in it. Nothing else stages records on a replica meanwhile.
    let stats = loop {
        let stats = shared.engine.stats().await.map_err(|x| x.to_string())?;
        if let Some(failure) = stats.iter().find_map(|s| s.failure.clone()) {
            return Err(failure);
        }
        if stats.iter().all(|s| s.durable_lsn >= s.next_lsn) {
            break stats;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    };
    let mut hellos = Vec::new();
    if shared.resync_requested.swap(false, Ordering::AcqRel) {
        // An operator asked for a re-sync: every shard, by a rewind to
        // where its log parts from the upstream's if the epoch histories
        // tell, else from a snapshot.
        plan.pending = stats.iter().map(|s| s.shard).collect();
        plan.snapshot_only.clear();
    }
    for s in stats.iter().filter(|s| plan.pending.contains(&s.shard)) {
        let allows = if plan.snapshot_only.contains(&s.shard) {
            crate::format::RESYNC_SNAPSHOT_ONLY
        } else {
            crate::format::RESYNC_MAY_REWIND
        };
        hellos.extend(frame(FrameKind::Resync, s.shard, s.epoch, allows, &[]));
    }
    for s in &stats {
        let hello = Hello {
            cluster_id: shared.cluster(),
            shard_count: stats.len() as u32,
            lsn: s.next_lsn,
            chain: s.chain,
            history: {
                let n = s.epochs.len();
                s.epochs[n.saturating_sub(crate::format::HELLO_HISTORY_MAX)..].to_vec()
            },
            node_id: shared.node_id.clone(),
        };
        // `start_lsn`: this node's client port, where clients reach it,
        // and whether it serves reads.
        hellos.extend(frame(
            FrameKind::Hello,
            s.shard,
            s.epoch,
            u64::from(shared.listen.port())
                | if shared.config.warm_standby {
                    HELLO_STANDBY
                } else {
                    0
                },
            &hello.encode(),
        ));
    }
    // The upstream counts a Hello's positions as held here: like an ack,
    // none is sent once this node stopped following (it voted), and what
    // was computed before that is at or below what the vote reported.
    if shared.follow_generation.load(Ordering::Acquire) != generation {
        return Err("stopped following".into());
    }
    stream.write_all(&hellos).await.map_err(e)?;
    if let Ok(mut u) = shared.upstream.lock() {
        u.connected = true;
        u.last_error = None;
        // Until this link's first heartbeat says otherwise (none comes
        // while snapshots are sent), the upstream is taken to hear its
        // primary, as before heartbeats carried it: a value from an
        // earlier link does not stand for this one.
        u.upstream_silence = Duration::ZERO;
        u.applied = stats.iter().map(|s| s.next_lsn).collect();
        u.head = u.applied.clone();
        u.epoch = stats.iter().map(|s| s.epoch).collect();
    }
    tracing::info!(%upstream, "following upstream");
    let (mut reader, writer) = futures_lite::io::split(stream);
    // Records are handed to the engine as they arrive (in order, so they
    // share the replica's group commits); a task of its own waits for each
    // to become durable and acks it, in order.
    let (tx, rx) = glommio::channels::local_channel::new_bounded::<Applying>(256);
    let failure: Rc<RefCell<Option<String>>> = Rc::default();
    let acks = glommio::spawn_local(send_acks(
        shared.clone(),
        writer,
        rx,
        failure.clone(),
        generation,
    ));
    let mut seen: Vec<u64> = stats.iter().map(|s| s.epoch).collect();
    // Where each shard's next records must start: a frame that starts
    // elsewhere means frames were lost on the way (not a divergence).
    let mut expect: Vec<u64> = stats.iter().map(|s| s.next_lsn).collect();
    let mut reported = Instant::now();
    let mut incoming: Option<std::fs::File> = None;
    // Shards rewound on this link: the upstream ends it after telling.
    let mut rewound = Vec::new();
    loop {
        if let Some(why) = failure.borrow_mut().take() {
            return Err(why);
        }
        if shared.follow_generation.load(Ordering::Acquire) != generation {
            return Ok(());
        }
        // Every second or so (frames arrive at least every heartbeat), what
        // this node knows of its own downstreams goes up.
        if reported.elapsed() >= Duration::from_secs(1) {
            reported = Instant::now();
            let stats = shared.engine.stats().await.map_err(|x| x.to_string())?;
            if let Some(json) = super::admin::downstream_report(shared, &stats)
                && tx.send(Applying::Report(json)).await.is_err()
            {
                return Err("the ack task ended".into());
            }
        }
        let next = glommio::timer::timeout(SILENCE_MAX, async {
            Ok(next_frame(&mut reader, &mut input, shared).await)
        })
        .await
        .map_err(|_| {
            format!(
                "nothing from the upstream in {SILENCE_MAX:?}: it is gone or the link is half open"
            )
        })?
        .map_err(e)?;
        let Some((kind, shard, epoch, start, payload)) = next else {
            return if shared.stopping() {
                Ok(())
            } else if !rewound.is_empty() {
                Err(format!(
                    "rewound (shard, lsn) {rewound:?} to where the logs part; following again from there"
                ))
            } else {
                Err("upstream closed".into())
            };
        };
        if let Ok(mut u) = shared.upstream.lock() {
            u.last_frame = Some(Instant::now());
        }
        let i = shard as usize;
        if matches!(
            kind,
            FrameKind::Records
                | FrameKind::Heartbeat
                | FrameKind::Snapshot
                | FrameKind::SnapshotEnd
                | FrameKind::Rewind
        ) {
            if i >= seen.len() {
                return Err(format!(
                    "refused: a frame for shard {shard}, which this node does not have"
                ));
            }
            if epoch < seen[i] {
                // An upstream from before a failover: never take its word.
                let why = format!(
                    "shard {shard}: a frame of epoch {epoch} after epoch {} was seen: the upstream is stale (fenced)",
                    seen[i]
                );
                // The ack task tells the upstream, after what it has queued.
                let _ = tx.send(Applying::Refuse(shard, why.clone())).await;
                drop(tx);
                acks.await;
                return Err(format!("refused: {why}"));
            }
            if epoch > seen[i] {
                // Kept: promoted later, this node begins above it even if
                // none of its records reached this log (a replica behind,
                // or one whose unsynced records a crash cut). The request
                // goes before anything of the epoch is handed to the shard,
                // which then knows it; it is made durable beside the
                // records rather than ahead of them (a few fsyncs, which
                // would hold up the stream).
                let raised = shared.engine.raise_epoch_floor(shard, epoch);
                glommio::spawn_local(async move {
                    if let Err(e) = raised.await {
                        tracing::warn!(shard, epoch, error = %e, "could not keep the epoch seen");
                    }
                })
                .detach();
            }
            seen[i] = epoch;
            if let Ok(mut u) = shared.upstream.lock()
                && let Some(e) = u.epoch.get_mut(i)
            {
                *e = epoch;
            }
        }
        match kind {
            FrameKind::Records => {
                if start != expect[i] {
                    return Err(format!(
                        "shard {shard}: records start at lsn {start}, expected {}: frames were lost on the way",
                        expect[i]
                    ));
                }
                let end = start + payload.len() as u64;
                expect[i] = end;
                let answer = shared
                    .engine
                    .replicate_at(shard, payload, CommitLevel::Local);
                if let Ok(mut u) = shared.upstream.lock()
                    && let Some(h) = u.head.get_mut(i)
                {
                    *h = (*h).max(end);
                }
                let applying = Applying::Records {
                    shard,
                    epoch,
                    start,
                    end,
                    answer,
                };
                if tx.send(applying).await.is_err() {
                    return Err(failure
                        .borrow_mut()
                        .take()
                        .unwrap_or_else(|| "the ack task ended".into()));
                }
            }
            FrameKind::Snapshot => {
                // Pieces go to a file in the shard's directory, in order.
                let path = shared.engine.shard_dir(shard).join(INCOMING_SNAPSHOT);
                let written = std::fs::metadata(&path).map_or(0, |m| m.len());
                if start == 0 {
                    incoming = Some(
                        std::fs::File::create(&path)
                            .map_err(|x| format!("{}: {x}", path.display()))?,
                    );
                } else if start != written || incoming.is_none() {
                    return Err(format!(
                        "shard {shard}: snapshot piece at {start}, expected {written}: pieces were lost"
                    ));
                }
                if let Some(f) = incoming.as_mut() {
                    use std::io::Write;
                    f.write_all(&payload).map_err(|x| x.to_string())?;
                }
            }
            FrameKind::SnapshotEnd => {
                let end = decode_fixed::<crate::format::SnapshotEnd>(kind, &payload)
                    .map_err(|x| x.to_string())?;
                let path = shared.engine.shard_dir(shard).join(INCOMING_SNAPSHOT);
                let file = incoming.take().ok_or("a snapshot end without a snapshot")?;
                file.sync_all().map_err(|x| x.to_string())?;
                drop(file);
                let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                if len != end.file_bytes.get() {
                    return Err(format!(
                        "shard {shard}: snapshot of {} bytes announced, {len} received",
                        end.file_bytes.get()
                    ));
                }
                let at = Expect {
                    lsn: end.lsn.get(),
                    chain: end.chain.get(),
                    epoch: end.epoch.get(),
                };
                // Everything handed to the engine before must be staged
                // first: the shard is replaced.
                tracing::warn!(
                    shard,
                    lsn = at.lsn,
                    "re-syncing from the upstream's snapshot"
                );
                let installed = shared
                    .engine
                    .install_snapshot(shard, path, at)
                    .await
                    .map_err(|x| {
                        format!("shard {shard}: installing the upstream's snapshot: {x}")
                    })?;
                forget_downstream_positions(shared, shard);
                expect[i] = installed.lsn;
                plan.pending.remove(&shard);
                plan.snapshot_only.remove(&shard);
                if let Ok(mut u) = shared.upstream.lock() {
                    if let Some(a) = u.applied.get_mut(i) {
                        *a = installed.lsn;
                    }
                    if let Some(h) = u.head.get_mut(i) {
                        *h = (*h).max(installed.lsn);
                    }
                    u.resyncs += 1;
                }
                let ack = Ack {
                    written: installed.lsn.into(),
                    flushed: installed.lsn.into(),
                    applied: installed.lsn.into(),
                };
                let applying = Applying::Done(shard, epoch, ack);
                if tx.send(applying).await.is_err() {
                    return Err("the ack task ended".into());
                }
            }
            FrameKind::Rewind if plan.pending.contains(&shard) => {
                // The epoch histories part at `start`: what this node holds
                // past it is not the upstream's history. Kept aside, never
                // dropped; if it cannot be done here, a snapshot is asked
                // for on the next link.
                match shared.engine.rewind(shard, start).await {
                    Ok(at) => {
                        tracing::warn!(
                            shard,
                            lsn = at.lsn,
                            "rewound to where the log parts from the upstream's; the records past it are kept aside"
                        );
                        forget_downstream_positions(shared, shard);
                        plan.pending.remove(&shard);
                        rewound.push((shard, at.lsn));
                        if let Ok(mut u) = shared.upstream.lock() {
                            u.rewinds += 1;
                            if let Some(a) = u.applied.get_mut(i) {
                                *a = at.lsn;
                            }
                        }
                    }
                    Err(x) => {
                        tracing::warn!(shard, lsn = start, error = %x, "cannot rewind; asking for a snapshot instead");
                        plan.snapshot_only.insert(shard);
                        return Err(format!(
                            "shard {shard}: rewinding to lsn {start}: {x}; a snapshot re-sync follows"
                        ));
                    }
                }
            }
            FrameKind::Heartbeat => {
                let beat = decode_fixed::<Heartbeat>(kind, &payload).map_err(|x| x.to_string())?;
                let now_micros = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64);
                if let Ok(mut u) = shared.upstream.lock() {
                    if let Some(h) = u.head.get_mut(i) {
                        *h = (*h).max(beat.durable_lsn.get());
                    }
                    u.clock_skew_micros = beat.unix_micros.get() as i64 - now_micros;
                    // An upstream that predates the field sends 0: it is
                    // taken to hear its primary, as it was before. One that
                    // never heard a primary sends u64::MAX: so is this one.
                    u.upstream_silence = if start == u64::MAX {
                        Duration::MAX
                    } else {
                        Duration::from_millis(start)
                    };
                    note_behind(&mut u);
                }
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

/// Starts or ends the "behind" clock of a replica's link.
fn note_behind(u: &mut Upstream) {
    let behind = u.head.iter().zip(&u.applied).any(|(h, a)| h > a);
    match (behind, u.behind_since) {
        (false, _) => u.behind_since = None,
        (true, None) => u.behind_since = Some(Instant::now()),
        (true, Some(_)) => {}
    }
}

/// What the frame reader hands the ack task of a replica.
enum Applying {
    Records {
        shard: u32,
        epoch: u64,
        start: u64,
        end: u64,
        answer: crate::engine::Answer<Option<crate::engine::ShardReceipt>>,
    },
    /// Tell the upstream why the stream is refused.
    Refuse(u32, String),
    /// Ack this at once (a snapshot installed).
    Done(u32, u64, Ack),
    /// Tell the upstream about this node's own downstreams.
    Report(Vec<u8>),
}

/// Acks each batch of records once it is durable here, in order. A batch
/// that does not continue this log is refused: the reason goes into
/// `failure` and to the upstream, and nothing after it is acked.
async fn send_acks(
    shared: Arc<Shared>,
    mut writer: impl futures_lite::AsyncWrite + Unpin,
    rx: glommio::channels::local_channel::LocalReceiver<Applying>,
    failure: Rc<RefCell<Option<String>>>,
    generation: u64,
) {
    let mut next = rx.recv().await;
    while let Some(applying) = next {
        let out = match applying {
            Applying::Records {
                shard,
                epoch,
                start,
                end,
                answer,
            } => {
                if let Err(x) = answer.await {
                    let why = format!(
                        "shard {shard}: records at lsn {start} do not continue this log: {x}"
                    );
                    refuse(&mut writer, shard, epoch, &why).await;
                    *failure.borrow_mut() = Some(format!("refused: {why}"));
                    return;
                }
                if let Ok(mut u) = shared.upstream.lock() {
                    if let Some(a) = u.applied.get_mut(shard as usize) {
                        *a = (*a).max(end);
                    }
                    note_behind(&mut u);
                }
                shared.ack_signal.notify(&shared);
                let ack = Ack {
                    written: end.into(),
                    flushed: end.into(),
                    applied: end.into(),
                };
                frame(FrameKind::Ack, shard, epoch, 0, ack.as_bytes())
            }
            Applying::Done(shard, epoch, ack) => {
                frame(FrameKind::Ack, shard, epoch, 0, ack.as_bytes())
            }
            Applying::Report(json) => frame(FrameKind::Report, 0, 0, 0, &json),
            Applying::Refuse(shard, why) => {
                refuse(&mut writer, shard, 0, &why).await;
                return;
            }
        };
        // A node that stopped following (it voted or stands in an
        // election) acknowledges nothing more: what an ack carries was
        // durable before it stopped, so the positions it gives voting are
        // at or past everything it acknowledged.
        if shared.follow_generation.load(Ordering::Acquire) != generation {
            *failure.borrow_mut() = Some("stopped following".into());
            return;
        }
        if writer.write_all(&out).await.is_err() {
            *failure.borrow_mut() = Some("upstream closed".into());
            return;
        }
        // Flush only when nothing more is ready.
        next = match futures_lite::future::poll_once(rx.recv()).await {
            Some(next) => next,
            None => {
                if writer.flush().await.is_err() {
                    *failure.borrow_mut() = Some("upstream closed".into());
                    return;
                }
                rx.recv().await
            }
        };
    }
}

/// Tells the upstream why the stream is refused (it ends after this).
async fn refuse(
    writer: &mut (impl futures_lite::AsyncWrite + Unpin),
    shard: u32,
    epoch: u64,
    why: &str,
) {
    let _ = writer
        .write_all(&frame(FrameKind::Refuse, shard, epoch, 0, why.as_bytes()))
        .await;
    let _ = writer.flush().await;
}

/// Where two logs' epoch histories part: the first LSN (at or after the
/// oldest both still know) at which they are in different epochs. `None`
/// when they agree everywhere both know (a divergence is then within one
/// epoch, at or before where it was detected).
pub(super) fn fork_point(ours: &[(u64, u64)], theirs: &[(u64, u64)]) -> Option<u64> {
    let epoch_at = |h: &[(u64, u64)], lsn: u64| {
        h.iter()
            .take_while(|(_, start)| *start <= lsn)
            .last()
            .map(|(e, _)| *e)
    };
    let known = ours.first()?.1.max(theirs.first()?.1);
    let mut bounds: Vec<u64> = ours
        .iter()
        .chain(theirs)
        .map(|(_, start)| *start)
        .filter(|start| *start >= known)
        .collect();
    bounds.push(known);
    bounds.sort_unstable();
    bounds.dedup();
    bounds
        .into_iter()
        .find(|lsn| epoch_at(ours, *lsn) != epoch_at(theirs, *lsn))
}

/// Where a re-synced downstream may rewind to instead of taking a
/// snapshot: where the epoch histories part, when they agree before it (so
/// that it is where they part, not merely where the shorter history
/// starts), inside what this node holds (`first_lsn..=durable`), and below
/// the downstream's end. The downstream still checks that it is a record
/// boundary of its log, and this node the chain there when it says Hello.
pub(super) fn rewind_point(
    ours: &[(u64, u64)],
    theirs: &[(u64, u64)],
    their_end: u64,
    first_lsn: u64,
    durable: u64,
) -> Option<u64> {
    let known = ours.first()?.1.max(theirs.first()?.1);
    fork_point(ours, theirs)
        .filter(|f| *f > known && *f < their_end && *f >= first_lsn && *f <= durable)
}

/// The refusal of a diverged downstream: where its log parts from this
/// node's, as far as the epoch histories tell, and where it ends.
fn diverged(
    shard: u32,
    ours: &[(u64, u64)],
    theirs: &[(u64, u64)],
    detected: u64,
    end: u64,
) -> (String, serde_json::Value) {
    let fork = fork_point(ours, theirs);
    let why = match fork {
        Some(fork) => format!(
            "shard {shard}: the downstream's log parts from this node's at lsn {fork} (their epochs differ from there) and ends at {end}: the range {fork}..{end} is not this node's (diverged)"
        ),
        None => format!(
            "shard {shard}: the downstream's log does not continue this node's at lsn {detected} (it ends at {end}): diverged within an epoch, at or before {detected}"
        ),
    };
    let range = serde_json::json!({
        "shard": shard,
        "from_lsn": fork,
        "detected_at_lsn": detected,
        "to_lsn": end,
    });
    (why, range)
}

/// Sets its flag when dropped: the task holding it has ended.
struct DoneOnDrop(std::rc::Rc<std::cell::Cell<bool>>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

/// Records on the status page where a refused downstream diverged.
fn set_diverged(shared: &Shared, key: &str, host: &str, range: serde_json::Value) {
    let key = if key.is_empty() { host } else { key };
    if let Ok(mut d) = shared.downstreams.lock()
        && let Some(d) = d.get_mut(key)
    {
        d.diverged = Some(range);
    }
}

/// Records on the status page that a downstream was refused, and why.
fn refused(shared: &Shared, key: &str, host: &str, why: &str) {
    let key = if key.is_empty() { host } else { key };
    if let Ok(mut d) = shared.downstreams.lock() {
        let entry = d.entry(key.to_string()).or_insert_with(|| Downstream {
            host: host.to_string(),
            node_id: key.to_string(),
            ..Downstream::default()
        });
        entry.refused = Some(why.to_string());
    }
}

/// The `ROLE` reply, in Redis's shape: a primary lists its replicas
/// `[host, port, acked offset]`; a replica names its primary and link state.
pub(super) fn role(shared: &Shared, offset: u64) -> crate::server::resp::Reply {
    use crate::server::resp::Reply;
    if shared.is_replica() {
        let upstream = shared.replica_of();
        let (host, port) = upstream.rsplit_once(':').unwrap_or((&upstream, "0"));
        let connected = shared.upstream.lock().map(|u| u.connected).unwrap_or(false);
        return Reply::Array(vec![
            Reply::bulk("slave"),
            Reply::Bulk(Bytes::copy_from_slice(host.as_bytes())),
            Reply::Int(port.parse().unwrap_or(0)),
            Reply::bulk(if connected { "connected" } else { "connect" }),
            Reply::Int(offset as i64),
        ]);
    }
    Reply::Array(vec![
        Reply::bulk("master"),
        Reply::Int(offset as i64),
        Reply::Array(replica_list(shared, true)),
    ])
}

#[cfg(test)]
mod tests {
    use super::{Downstream, fork_point, rewind_point};
    use std::time::{Duration, Instant};

    #[test]
    fn catch_up_seconds_is_the_lag_over_the_rate_it_closes_at() {
        use super::Progress;
        // Times after a base, never before it: an Instant cannot go below
        // the machine's boot.
        let base = Instant::now();
        let now = base + Duration::from_secs(500);
        let note = |ago: u64, flushed: u64, head: u64| Progress {
            at: now - Duration::from_secs(ago),
            flushed,
            head,
        };
        let mut d = Downstream {
            flushed: vec![1_000, 0],
            ..Downstream::default()
        };
        // No earlier note: no estimate yet (unless caught up).
        assert_eq!(d.catch_up_seconds_at(now, 4_000, 5_000, false), None);
        assert_eq!(d.catch_up_seconds_at(now, 0, 1_000, true), Some(0.0));
        // Catching up: 3,000 bytes made durable in the last 10 s while this
        // node wrote 1,000: the lag closes at 200 B/s, 4,000 bytes is 20 s.
        d.progress = [note(10, 0, 5_000)].into();
        d.flushed = vec![2_500, 500];
        let eta = d.catch_up_seconds_at(now, 4_000, 6_000, false).unwrap();
        assert!((eta - 20.0).abs() < 0.1, "{eta}");
        // Falling behind (writes outpace it): no estimate.
        d.progress = [note(10, 0, 5_000)].into();
        assert_eq!(d.catch_up_seconds_at(now, 4_000, 9_000, false), None);
        // Streaming, acks on the way: the lag at its durable rate (300 B/s).
        d.progress = [note(10, 0, 5_000)].into();
        let eta = d.catch_up_seconds_at(now, 300, 9_000, true).unwrap();
        assert!((eta - 1.0).abs() < 0.01, "{eta}");
        // Notes older than the window are dropped; no progress since the
        // one left: no estimate.
        d.progress = [note(400, 0, 0), note(5, 3_000, 9_000)].into();
        assert_eq!(
            d.catch_up_seconds_at(now, 4_000, 9_000, false),
            None,
            "stalled"
        );
        // Positions forgotten (they went back): start again.
        d.flushed = vec![0, 0];
        assert_eq!(d.catch_up_seconds_at(now, 4_000, 9_000, false), None);
        assert_eq!(d.progress.len(), 1);
    }

    #[test]
    fn a_rewind_goes_only_where_the_histories_part_after_agreeing() {
        // An old primary that kept writing in epoch 1 past where epoch 2
        // began on the promoted node: back to 500.
        assert_eq!(
            rewind_point(&[(1, 0), (2, 500)], &[(1, 0)], 900, 0, 1000),
            Some(500)
        );
        // This node released below 1000: its history starts there, in
        // epoch 2, and says nothing of where the logs parted before it.
        assert_eq!(
            rewind_point(&[(2, 1000)], &[(1, 0)], 2000, 1000, 3000),
            None
        );
        // Not below the downstream's end, not in what this node holds.
        assert_eq!(
            rewind_point(&[(1, 0), (2, 500)], &[(1, 0)], 500, 0, 1000),
            None
        );
        assert_eq!(
            rewind_point(&[(1, 0), (2, 500)], &[(1, 0)], 900, 600, 1000),
            None
        );
        assert_eq!(
            rewind_point(&[(1, 0), (2, 500)], &[(1, 0)], 900, 0, 400),
            None
        );
        // The same history: nothing to rewind by epochs.
        assert_eq!(rewind_point(&[(1, 0)], &[(1, 0)], 900, 0, 1000), None);
    }

    #[test]
    fn fork_points_of_epoch_histories() {
        // A failover at 500: the old primary stayed in epoch 1.
        assert_eq!(fork_point(&[(1, 0), (2, 500)], &[(1, 0)]), Some(500));
        assert_eq!(fork_point(&[(1, 0)], &[(1, 0), (2, 500)]), Some(500));
        // The same history: nothing to tell.
        assert_eq!(fork_point(&[(1, 0), (2, 500)], &[(1, 0), (2, 500)]), None);
        // What one side released is not compared.
        assert_eq!(fork_point(&[(2, 500)], &[(1, 0), (2, 500)]), None);
        // Two later epochs started in different places: the earlier one.
        assert_eq!(
            fork_point(&[(1, 0), (2, 500)], &[(1, 0), (3, 400)]),
            Some(400)
        );
        assert_eq!(fork_point(&[], &[(1, 0)]), None);
    }
}
