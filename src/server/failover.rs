//! Automatic failover: when a replica stops hearing its primary, the data
//! nodes elect a new one, which first gathers every record a majority
//! holds, then starts a new epoch; the others, and the old primary when it
//! comes back, follow it.
//!
//! The rules (ARCHITECTURE.md, Failover), with `n` the data nodes this node
//! knows (its peers and itself):
//!
//! 1. A replica that has heard nothing from its upstream (records or
//!    heartbeats) for the election timeout, plus a random part of it, first
//!    asks its peers who is primary (`TIDEWAL.WHO`): one in an epoch above
//!    its own log's is followed. Otherwise, unless configured never to
//!    stand (`failover_candidate = false`), it asks whether a majority would
//!    vote for it (a pre-vote, which takes nothing and stops nothing: a
//!    node that alone lost its link, or whose link is busy re-syncing, goes
//!    on following), and if so stands in epoch `T`, one above every epoch
//!    it has seen or voted in.
//! 2. Standing, it votes for itself, durably, stops following (it acks
//!    nothing more to the old primary), and asks every peer for its vote
//!    (`TIDEWAL.VOTE`). A peer grants one vote per epoch, kept durably
//!    before it answers, and only when: it is not a primary itself, it too
//!    has heard nothing from its upstream for the election timeout (so a
//!    node that cannot reach the primary does not depose one that others
//!    still hear), and the candidate's log is in no older epoch than its
//!    own. Granting, it stops following as well, and answers with its
//!    durable position per shard, read after it stopped: nothing past it
//!    was or will be acknowledged to the old primary by this node.
//! 3. With a majority of `n` (itself included), the candidate fetches from
//!    the voters, shard by shard, the records any of them holds past its own
//!    (`TIDEWAL.FETCH`, each batch checked against its chain as a stream's
//!    is), then begins an epoch of at least `T` and takes writes. A write
//!    acknowledged at `replicated(k)` is durable on `k` replicas; when
//!    `k + 1` is a majority of `n`, every majority holds one of them, so
//!    the winner has it. Writes acknowledged at lower levels may be lost in
//!    a failover; the old primary keeps them aside when it rejoins.
//! 4. A primary asks its peers who is primary every election timeout: one
//!    in a higher epoch deposes it; it follows that node, and, refused as
//!    diverged (it took writes the new primary never had), re-syncs
//!    automatically: its log is rewound to the fork and the cut records are
//!    kept in a quarantine file.
//!
//! A candidate that does not win stays stopped, and stands again after
//! another timeout, in a higher epoch, unless a primary in a higher epoch
//! has appeared meanwhile; a node that voted does the same. Neither goes
//! back to a primary of an older epoch: that is what keeps an old primary
//! from acknowledging, through them, writes the winner never saw.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::Shared;
use super::resp::{Reply, parse_reply};
use crate::engine::CommitLevel;
use crate::format::Expect;

pub(super) const VOTE_COMMAND: &[u8] = b"TIDEWAL.VOTE";
pub(super) const WHO_COMMAND: &[u8] = b"TIDEWAL.WHO";
pub(super) const FETCH_COMMAND: &[u8] = b"TIDEWAL.FETCH";
pub(super) const PEERS_COMMAND: &[u8] = b"TIDEWAL.PEERS";

/// In the data directory: the last vote, `EPOCH CANDIDATE`.
const VOTE_FILE: &str = "vote";

/// Records a `TIDEWAL.FETCH` answers with, about.
const FETCH_BYTES: usize = 1 << 20;

/// What this node knows of elections.
#[derive(Debug, Default)]
pub(super) struct Failover {
    /// The other data nodes (`HOST:PORT` of their client ports).
    pub peers: Vec<String>,
    /// The highest epoch this node voted in, and for whom (kept in
    /// `VOTE_FILE` before any answer depends on it).
    pub vote_epoch: u64,
    pub voted_for: String,
    /// Since when this node has stopped following because it voted or
    /// stood (`None`: it follows its upstream, or is a primary).
    pub stopped: Option<Instant>,
    /// Since when this node has followed its current upstream.
    pub since: Option<Instant>,
    /// The upstream this node follows because of a failover: when it
    /// refuses this node as diverged, this node re-syncs from it by itself.
    pub rejoin: String,
    /// Whether that re-sync was asked already.
    pub rejoin_resynced: bool,
    pub elections: u64,
    pub won: u64,
    /// The last election this node stood in, or deposition, for the status
    /// page.
    pub last: Option<serde_json::Value>,
}

impl Failover {
    /// Time since this node last heard its upstream (or began to follow
    /// it, or stopped following).
    fn silence(&self, last_frame: Option<Instant>) -> Duration {
        let since = [self.since, last_frame, self.stopped]
            .into_iter()
            .flatten()
            .max();
        since.map_or(Duration::MAX, |t| t.elapsed())
    }
}

/// Loads the vote kept in the data directory.
pub(super) fn load_vote(shared: &Shared) {
    let path = shared.config.data_dir.join(VOTE_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let mut words = text.split_whitespace();
    let epoch = words.next().and_then(|e| e.parse::<u64>().ok());
    let candidate = words.next().unwrap_or_default().to_string();
    match epoch {
        Some(epoch) => {
            if let Ok(mut f) = shared.failover.lock() {
                f.vote_epoch = epoch;
                f.voted_for = candidate;
            }
        }
        None => {
            tracing::warn!(path = %path.display(), "the vote file is not `EPOCH CANDIDATE`: ignored")
        }
    }
}

/// Makes the vote durable (file, then directory) on glommio's blocking
/// thread.
async fn keep_vote(shared: &Shared, epoch: u64, candidate: &str) -> Result<(), String> {
    let dir = shared.config.data_dir.clone();
    let text = format!("{epoch} {candidate}\n");
    glommio::executor()
        .spawn_blocking(move || {
            let path = dir.join(VOTE_FILE);
            let tmp = dir.join("vote.tmp");
            std::fs::write(&tmp, text)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| format!("keeping the vote: {e}"))
}

/// Whether `addr` names this node's client port.
pub(super) fn is_own_address(shared: &Shared, addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Some(a) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    a == shared.listen
        || (a.port() == shared.listen.port()
            && (a.ip().is_loopback() || shared.listen.ip().is_unspecified()))
}

/// The configured peers, without this node.
pub(super) fn set_peers(shared: &Shared, peers: &[String]) -> Vec<String> {
    let peers: Vec<String> = peers
        .iter()
        .filter(|p| !p.is_empty() && !is_own_address(shared, p))
        .cloned()
        .collect();
    if let Ok(mut f) = shared.failover.lock() {
        f.peers = peers.clone();
    }
    peers
}

fn peers(shared: &Shared) -> Vec<String> {
    shared
        .failover
        .lock()
        .map(|f| f.peers.clone())
        .unwrap_or_default()
}

/// The highest epoch of any shard's log here.
fn log_epoch(stats: &[crate::engine::ShardStats]) -> u64 {
    stats.iter().map(|s| s.epoch).max().unwrap_or(0)
}

/// Stops following the upstream (a vote was given or asked): the follower
/// ends and acks nothing more (`send_acks` checks the generation before
/// each ack it writes). The node stays a read-only replica.
fn stop_following(shared: &Shared, why: String) {
    shared.follow_generation.fetch_add(1, Ordering::AcqRel);
    if let Ok(mut u) = shared.upstream.lock() {
        u.connected = false;
        u.last_error = Some(why);
    }
    // The next election waits a whole timeout from now.
    if let Ok(mut f) = shared.failover.lock() {
        f.stopped = Some(Instant::now());
    }
}

/// `TIDEWAL.VOTE epoch candidate candidate_log_epoch [PRE]`: grants or
/// refuses this node's vote; a grant carries each shard's durable LSN.
/// With `PRE`, only says whether it would, taking nothing.
pub(super) async fn vote(shared: Arc<Shared>, args: Vec<Bytes>) -> Reply {
    let number = |i: usize| {
        std::str::from_utf8(&args[i])
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
    };
    let (Some(epoch), Some(their_log)) = (number(1), number(3)) else {
        return Reply::err("TIDEWAL.VOTE epoch candidate log-epoch: epochs are numbers");
    };
    let candidate = String::from_utf8_lossy(&args[2]).to_string();
    let pre = match args.get(4) {
        None => false,
        Some(a) if a.eq_ignore_ascii_case(b"PRE") => true,
        Some(_) => return Reply::err("TIDEWAL.VOTE epoch candidate log-epoch [PRE]"),
    };
    let refuse = |why: String| Reply::Array(vec![Reply::Int(0), Reply::Simple(why)]);
    let Ok(stats) = shared.engine.stats().await else {
        return refuse("this node's engine is closed".into());
    };
    let ours = log_epoch(&stats);
    let seen = stats
        .iter()
        .map(|s| s.epoch.max(s.epoch_floor))
        .max()
        .unwrap_or(0);
    let timeout = Duration::from_millis(shared.config.election_timeout_ms);
    let last_frame = shared.upstream.lock().ok().and_then(|u| u.last_frame);
    {
        let Ok(mut f) = shared.failover.lock() else {
            return refuse("poisoned".into());
        };
        let here = Here {
            primary: !shared.is_replica(),
            vote_epoch: f.vote_epoch,
            voted_for: &f.voted_for,
            hears_upstream: f.stopped.is_none() && f.silence(last_frame) < timeout,
            log_epoch: ours,
            seen,
        };
        if let Some(why) = refusal(&here, epoch, &candidate, their_log) {
            return refuse(why);
        }
        if pre {
            // Asked whether it would: nothing is taken, nothing stops.
            return Reply::Array(vec![
                Reply::Int(1),
                Reply::Simple("would grant".into()),
                Reply::Array(Vec::new()),
            ]);
        }
        // Taken at once, under the lock: a second candidate in this epoch
        // is refused even while this vote is being made durable.
        f.vote_epoch = epoch;
        f.voted_for = candidate.clone();
    }
    stop_following(
        &shared,
        format!("stopped following: voted for {candidate} in epoch {epoch}"),
    );
    if let Err(e) = keep_vote(&shared, epoch, &candidate).await {
        return refuse(e);
    }
    tracing::warn!(%candidate, epoch, "voted in an election");
    // Positions read after the follower stopped: nothing past them is
    // acknowledged upstream by this node.
    let Ok(stats) = shared.engine.stats().await else {
        return refuse("this node's engine is closed".into());
    };
    Reply::Array(vec![
        Reply::Int(1),
        Reply::Simple("granted".into()),
        Reply::Array(
            stats
                .iter()
                .map(|s| Reply::Int(s.durable_lsn as i64))
                .collect(),
        ),
    ])
}

/// What a node asked for its vote goes by.
struct Here<'a> {
    primary: bool,
    /// Its last vote.
    vote_epoch: u64,
    voted_for: &'a str,
    /// It follows its upstream and heard from it within the election
    /// timeout.
    hears_upstream: bool,
    /// The highest epoch of its shards' logs, and the highest it has held
    /// or seen (floors included).
    log_epoch: u64,
    seen: u64,
}

/// Why a node in the state `here` refuses its vote to `candidate`, standing
/// in `epoch` with a log in `their_log`; `None` grants it.
fn refusal(here: &Here, epoch: u64, candidate: &str, their_log: u64) -> Option<String> {
    let again = epoch == here.vote_epoch && here.voted_for == candidate;
    if here.primary {
        Some(format!(
            "this node is the primary, in epoch {}, and is up",
            here.log_epoch
        ))
    } else if epoch <= here.vote_epoch && !again {
        Some(format!(
            "voted in epoch {} already (for {})",
            here.vote_epoch, here.voted_for
        ))
    } else if here.hears_upstream {
        Some("this node hears its upstream (within the election timeout)".into())
    } else if their_log < here.log_epoch {
        Some(format!(
            "the candidate's log is in epoch {their_log}, this node's in {}: the candidate is behind a failover",
            here.log_epoch
        ))
    } else if epoch <= here.seen {
        Some(format!(
            "epoch {epoch} is not above {}, seen here",
            here.seen
        ))
    } else {
        None
    }
}

/// Votes that elect among `nodes` data nodes.
fn majority(nodes: usize) -> usize {
    nodes / 2 + 1
}

/// `TIDEWAL.WHO`: this node's role, its log's epoch and its upstream.
pub(super) async fn who(shared: Arc<Shared>) -> Reply {
    let epoch = shared.engine.stats().await.map_or(0, |s| log_epoch(&s));
    let role = if shared.is_replica() {
        "replica"
    } else {
        "primary"
    };
    Reply::Array(vec![
        Reply::bulk(role),
        Reply::Int(epoch as i64),
        Reply::Bulk(Bytes::from(shared.replica_of())),
    ])
}

/// `TIDEWAL.FETCH shard lsn chain epoch`: durable records of `shard` from
/// `lsn` on, which must continue `(chain, epoch)`; empty when there are
/// none.
pub(super) async fn fetch(shared: Arc<Shared>, args: Vec<Bytes>) -> Reply {
    let number = |i: usize| {
        std::str::from_utf8(&args[i])
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
    };
    let (Some(shard), Some(lsn), Some(chain), Some(epoch)) =
        (number(1), number(2), number(3), number(4))
    else {
        return Reply::err("TIDEWAL.FETCH shard lsn chain epoch: numbers");
    };
    let (Ok(shard), Ok(chain)) = (u32::try_from(shard), u32::try_from(chain)) else {
        return Reply::err("TIDEWAL.FETCH: shard or chain out of range");
    };
    if shard >= shared.engine.shard_count() {
        return Reply::err(format!("TIDEWAL.FETCH: no shard {shard}"));
    }
    let from = Expect { lsn, chain, epoch };
    match shared.engine.read_log(shard, from, FETCH_BYTES).await {
        Ok(batch) => Reply::Bulk(batch.encoded),
        Err(e) => Reply::err(format!("TIDEWAL.FETCH: {e}")),
    }
}

/// Sends one command to `addr` and reads its reply, within `limit`.
async fn call(addr: &str, args: &[&[u8]], limit: Duration) -> Result<Reply, String> {
    let work = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut out = BytesMut::new();
        super::resp::encode_array_header(args.len(), &mut out);
        for a in args {
            Reply::Bulk(Bytes::copy_from_slice(a)).encode(&mut out);
        }
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut input = Vec::new();
        let mut buf = vec![0; 64 << 10];
        loop {
            match parse_reply(&input, 4 * FETCH_BYTES).map_err(|e| format!("{addr}: {e}"))? {
                Some((reply, _)) => return Ok(reply),
                None => {
                    let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err(format!("{addr} closed before answering"));
                    }
                    input.extend_from_slice(&buf[..n]);
                }
            }
        }
    };
    glommio::timer::timeout(limit, async { Ok(work.await) })
        .await
        .map_err(|_| format!("{addr} did not answer within {} ms", limit.as_millis()))?
}

/// A peer's answer to `TIDEWAL.WHO`: a primary, and its log's epoch.
async fn primary_above(shared: &Shared, epoch: u64, limit: Duration) -> Option<(String, u64)> {
    let asks: Vec<_> = peers(shared)
        .into_iter()
        .map(|p| async move { (call(&p, &[WHO_COMMAND], limit).await, p) })
        .collect();
    let mut best: Option<(String, u64)> = None;
    for ask in asks {
        let (answer, peer) = ask.await;
        if let Ok(Reply::Array(a)) = answer
            && let [Reply::Bulk(role), Reply::Int(e), ..] = a.as_slice()
            && role.as_ref() == b"primary"
            && (*e as u64) > epoch
            && best.as_ref().is_none_or(|(_, b)| (*e as u64) > *b)
        {
            best = Some((peer, *e as u64));
        }
    }
    best
}

/// Whether this node may follow `upstream`: always, unless it voted, and
/// then only an upstream whose log is in the epoch it voted in or a later
/// one (asked with `TIDEWAL.WHO`). Raft's rule that a node which has seen
/// a term rejects leaders of older ones.
pub(super) async fn may_follow(shared: &Shared, upstream: &str) -> Result<(), String> {
    let voted = shared.failover.lock().map(|f| f.vote_epoch).unwrap_or(0);
    if voted == 0 {
        return Ok(());
    }
    let limit = Duration::from_millis(shared.config.election_timeout_ms);
    match call(upstream, &[WHO_COMMAND], limit).await? {
        Reply::Array(a) => match a.as_slice() {
            [_, Reply::Int(e), ..] if *e as u64 >= voted => Ok(()),
            [_, Reply::Int(e), ..] => Err(format!(
                "not following {upstream}: its log is in epoch {e}, and this node voted in epoch {voted}"
            )),
            other => Err(format!("{upstream} answered TIDEWAL.WHO with {other:?}")),
        },
        Reply::Error(e) => Err(format!("{upstream} answered TIDEWAL.WHO with {e}")),
        other => Err(format!("{upstream} answered TIDEWAL.WHO with {other:?}")),
    }
}

/// Follows `primary`, elected in a failover; refused as diverged by it,
/// this node re-syncs by itself (see `follow`).
fn rejoin(shared: &Arc<Shared>, primary: &str, epoch: u64, why: &str) {
    tracing::warn!(%primary, epoch, "following the primary of a newer epoch ({why})");
    let generation = shared.set_upstream(primary);
    if let Ok(mut f) = shared.failover.lock() {
        f.rejoin = primary.to_string();
        f.rejoin_resynced = false;
        f.last = Some(serde_json::json!({
            "outcome": why,
            "primary": primary,
            "epoch": epoch,
        }));
    }
    glommio::spawn_local(super::replication::follow(
        shared.clone(),
        primary.to_string(),
        generation,
    ))
    .detach();
}

/// Whether a follower refused by `upstream` should re-sync by itself: the
/// node follows it because of a failover, and has not tried yet.
pub(super) fn resync_after_refusal(shared: &Shared, upstream: &str) -> bool {
    let Ok(mut f) = shared.failover.lock() else {
        return false;
    };
    if f.rejoin != upstream || f.rejoin_resynced {
        return false;
    }
    f.rejoin_resynced = true;
    true
}

/// The election task: runs on the first executor for the node's life.
pub(super) async fn elections(shared: Arc<Shared>) {
    let timeout = Duration::from_millis(shared.config.election_timeout_ms.max(1));
    let tick = (timeout / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
    // Apart from the others, so that two replicas rarely stand together.
    let seed = shared.listen.port() as u64 ^ shared.started.elapsed().as_nanos() as u64;
    let mut rng = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut jitter = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        timeout.mul_f64((rng >> 11) as f64 / (1u64 << 53) as f64)
    };
    let mut wait = timeout + jitter();
    // The last time this node stood, or asked whether it could.
    let mut tried = Instant::now();
    let mut last_check = Instant::now() - timeout;
    while !shared.stopping() {
        glommio::timer::sleep(tick).await;
        if peers(&shared).is_empty() {
            continue;
        }
        let Ok(stats) = shared.engine.stats().await else {
            return;
        };
        let ours = log_epoch(&stats);
        if !shared.is_replica() {
            // A primary: deposed by one in a higher epoch?
            if last_check.elapsed() >= timeout {
                last_check = Instant::now();
                if let Some((primary, epoch)) = primary_above(&shared, ours, timeout).await
                    && !shared.is_replica()
                {
                    rejoin(&shared, &primary, epoch, "deposed by a newer primary");
                }
            }
            continue;
        }
        let last_frame = shared.upstream.lock().ok().and_then(|u| u.last_frame);
        let (silence, stopped) = match shared.failover.lock() {
            Ok(f) => (f.silence(last_frame), f.stopped.is_some()),
            Err(_) => return,
        };
        if silence < timeout && !stopped {
            continue;
        }
        // Silent or stopped: a primary in a newer epoch is followed.
        if last_check.elapsed() >= tick * 2 || silence >= wait {
            last_check = Instant::now();
            if let Some((primary, epoch)) = primary_above(&shared, ours, timeout).await
                && (stopped || primary != shared.replica_of())
            {
                rejoin(&shared, &primary, epoch, "a newer primary was elected");
                continue;
            }
        }
        if silence >= wait && tried.elapsed() >= wait && shared.config.failover_candidate {
            stand(&shared, timeout).await;
            tried = Instant::now();
            wait = timeout + jitter();
        }
    }
}

/// Stands in an election; on a win, becomes the primary.
async fn stand(shared: &Arc<Shared>, timeout: Duration) {
    let Ok(stats) = shared.engine.stats().await else {
        return;
    };
    let ours = log_epoch(&stats);
    let seen = stats
        .iter()
        .map(|s| s.epoch.max(s.epoch_floor))
        .max()
        .unwrap_or(0);
    let me = shared.listen.to_string();
    let peers = peers(shared);
    let needed = majority(peers.len() + 1);
    let next = |f: &Failover| seen.max(f.vote_epoch).checked_add(1);
    // Pre-vote: would a majority vote in the next epoch? Nothing is taken
    // and this node goes on following meanwhile, so one that alone lost
    // its link (or whose link is busy re-syncing) neither stops nor
    // raises epochs.
    let Some(epoch) = shared.failover.lock().ok().and_then(|f| next(&f)) else {
        return;
    };
    let would = ask(&peers, epoch, &me, ours, true, timeout).await.len() + 1;
    if would < needed {
        tracing::info!(
            epoch,
            would,
            needed,
            "pre-vote: not enough peers would vote"
        );
        if let Ok(mut f) = shared.failover.lock() {
            f.last = Some(serde_json::json!({
                "outcome": "not standing: a pre-vote found no majority",
                "epoch": epoch,
                "votes": would,
                "candidate": me,
            }));
        }
        return;
    }
    let Some(epoch) = ({
        let Ok(mut f) = shared.failover.lock() else {
            return;
        };
        let epoch = next(&f);
        if let Some(epoch) = epoch {
            f.vote_epoch = epoch;
            f.voted_for = me.clone();
            f.elections += 1;
        }
        epoch
    }) else {
        return;
    };
    stop_following(
        shared,
        format!("stopped following: standing in epoch {epoch}"),
    );
    let outcome = |what: String, votes: usize| {
        if let Ok(mut f) = shared.failover.lock() {
            f.last = Some(serde_json::json!({
                "outcome": what,
                "epoch": epoch,
                "votes": votes,
                "candidate": me,
            }));
        }
    };
    if let Err(e) = keep_vote(shared, epoch, &me).await {
        outcome(e, 0);
        return;
    }
    tracing::warn!(
        epoch,
        needed,
        "the upstream is silent: standing in an election"
    );
    let voters = ask(&peers, epoch, &me, ours, false, timeout).await;
    let votes = voters.len() + 1;
    if votes < needed {
        tracing::warn!(epoch, votes, needed, "not elected");
        outcome("not elected".into(), votes);
        return;
    }
    if let Err(e) = gather(shared, &voters, timeout).await {
        tracing::warn!(epoch, error = %e, "elected, but could not gather the voters' records");
        outcome(
            format!("elected, but could not gather the records: {e}"),
            votes,
        );
        return;
    }
    // Begin at least the epoch elected in.
    for shard in 0..shared.engine.shard_count() {
        if let Err(e) = shared.engine.raise_epoch_floor(shard, epoch - 1).await {
            outcome(format!("elected, but could not keep the epoch: {e}"), votes);
            return;
        }
    }
    if !shared.is_replica() || shared.stopping() {
        return;
    }
    shared.follow_generation.fetch_add(1, Ordering::AcqRel);
    match shared.engine.begin_epoch().await {
        Ok(begun) => {
            shared.set_upstream("");
            if let Ok(mut f) = shared.failover.lock() {
                f.won += 1;
                f.rejoin.clear();
            }
            outcome(format!("elected; primary in epoch {begun}"), votes);
            tracing::warn!(epoch = begun, votes, "elected: promoted to primary");
        }
        Err(e) => outcome(
            format!("elected, but could not begin the epoch: {e}"),
            votes,
        ),
    }
}

/// Asks every peer for its vote (or, `pre`, whether it would give it):
/// the peers that grant it, with their durable LSN per shard.
async fn ask(
    peers: &[String],
    epoch: u64,
    me: &str,
    ours: u64,
    pre: bool,
    limit: Duration,
) -> Vec<(String, Vec<u64>)> {
    let (epoch, ours) = (epoch.to_string(), ours.to_string());
    let mut args: Vec<&[u8]> = vec![
        VOTE_COMMAND,
        epoch.as_bytes(),
        me.as_bytes(),
        ours.as_bytes(),
    ];
    if pre {
        args.push(b"PRE");
    }
    let asks: Vec<_> = peers
        .iter()
        .map(|p| {
            let args = &args;
            async move { (call(p, args, limit).await, p.clone()) }
        })
        .collect();
    let mut granted = Vec::new();
    for ask in asks {
        match ask.await {
            (Ok(Reply::Array(a)), peer) => match a.as_slice() {
                [Reply::Int(1), _, Reply::Array(lsns)] => {
                    let lsns = lsns
                        .iter()
                        .map(|l| match l {
                            Reply::Int(n) => *n as u64,
                            _ => 0,
                        })
                        .collect();
                    granted.push((peer, lsns));
                }
                [Reply::Int(0), Reply::Simple(why), ..] => {
                    tracing::info!(%peer, %why, epoch, pre, "vote refused");
                }
                other => tracing::info!(%peer, ?other, "unexpected answer to a vote"),
            },
            (other, peer) => tracing::info!(%peer, ?other, pre, "no vote"),
        }
    }
    granted
}

/// Fetches, shard by shard, what the voter furthest ahead holds past this
/// node's log, and makes it durable here.
async fn gather(
    shared: &Shared,
    voters: &[(String, Vec<u64>)],
    limit: Duration,
) -> Result<(), String> {
    let engine = &shared.engine;
    for shard in 0..engine.shard_count() {
        let Some((peer, target)) = voters
            .iter()
            .filter_map(|(p, lsns)| lsns.get(shard as usize).map(|l| (p, *l)))
            .max_by_key(|(_, l)| *l)
        else {
            continue;
        };
        loop {
            // Whatever a previous link handed the engine is staged first
            // (staging is first come, first served), so the head read next
            // is where the log really ends.
            engine
                .replicate_at(shard, Bytes::new(), CommitLevel::Memory)
                .await
                .map_err(|e| e.to_string())?;
            let stats = engine.stats().await.map_err(|e| e.to_string())?;
            let Some(s) = stats.iter().find(|s| s.shard == shard) else {
                return Err(format!("shard {shard} is not open"));
            };
            if s.next_lsn >= target {
                break;
            }
            let numbers =
                [u64::from(shard), s.next_lsn, u64::from(s.chain), s.epoch].map(|n| n.to_string());
            let mut args: Vec<&[u8]> = vec![FETCH_COMMAND];
            args.extend(numbers.iter().map(|n| n.as_bytes()));
            let records = match call(peer, &args, limit).await? {
                Reply::Bulk(b) if !b.is_empty() => b,
                Reply::Bulk(_) => {
                    return Err(format!(
                        "{peer} has nothing past {} on shard {shard}, though it said {target}",
                        s.next_lsn
                    ));
                }
                other => return Err(format!("{peer}: {other:?}")),
            };
            engine
                .replicate_at(shard, records, CommitLevel::Local)
                .await
                .map_err(|e| {
                    format!("shard {shard}: {peer}'s records do not continue this log: {e}")
                })?;
        }
        tracing::info!(shard, %peer, lsn = target, "gathered the voters' records");
    }
    Ok(())
}

/// `TIDEWAL.PEERS [HOST:PORT ...]`: sets the peers (until restart; the
/// config's `peers` at start), then lists them.
pub(super) fn peers_command(shared: &Shared, args: &[Bytes]) -> Reply {
    if args.len() > 1 {
        let list: Vec<String> = args[1..]
            .iter()
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        set_peers(shared, &list);
    }
    Reply::Array(
        peers(shared)
            .into_iter()
            .map(|p| Reply::Bulk(p.into()))
            .collect(),
    )
}

/// The status page's `failover` object.
pub(super) fn status(shared: &Shared) -> serde_json::Value {
    let Ok(f) = shared.failover.lock() else {
        return serde_json::Value::Null;
    };
    serde_json::json!({
        "enabled": !f.peers.is_empty(),
        "peers": f.peers,
        "election_timeout_ms": shared.config.election_timeout_ms,
        "candidate": shared.config.failover_candidate,
        "vote_epoch": f.vote_epoch,
        "voted_for": f.voted_for,
        "stopped_seconds": f.stopped.map(|t| t.elapsed().as_secs_f64()),
        "elections": f.elections,
        "won": f.won,
        "last": f.last,
    })
}

#[cfg(test)]
mod tests {
    use super::{Here, majority, refusal};

    fn replica() -> Here<'static> {
        Here {
            primary: false,
            vote_epoch: 3,
            voted_for: "10.0.0.2:6379",
            hears_upstream: false,
            log_epoch: 2,
            seen: 2,
        }
    }

    #[test]
    fn a_vote_is_given_once_per_epoch_and_only_by_a_replica_that_lost_its_primary() {
        let c = "10.0.0.1:6379";
        assert_eq!(refusal(&replica(), 4, c, 2), None);
        // Asked again by the same candidate in the same epoch: the same
        // answer (a lost reply is asked for again); another one: refused.
        assert_eq!(refusal(&replica(), 3, "10.0.0.2:6379", 2), None);
        let why = refusal(&replica(), 3, c, 2).unwrap();
        assert!(why.contains("voted in epoch 3"), "{why}");
        assert!(refusal(&replica(), 2, c, 2).is_some());
        let primary = Here {
            primary: true,
            ..replica()
        };
        assert!(refusal(&primary, 9, c, 2).unwrap().contains("primary"));
        let hearing = Here {
            hears_upstream: true,
            ..replica()
        };
        assert!(refusal(&hearing, 9, c, 2).unwrap().contains("hears"));
        // A candidate whose log is older than this node's cannot hold what
        // this node may have acknowledged in its epoch.
        assert!(refusal(&replica(), 9, c, 1).unwrap().contains("behind"));
        // An epoch this node's shards have seen (a floor) is not reused.
        let floored = Here {
            seen: 7,
            ..replica()
        };
        assert!(refusal(&floored, 7, c, 2).unwrap().contains("not above"));
        assert_eq!(refusal(&floored, 8, c, 2), None);
    }

    #[test]
    fn a_majority_of_the_data_nodes_elects() {
        assert_eq!(majority(1), 1);
        assert_eq!(majority(2), 2);
        assert_eq!(majority(3), 2);
        assert_eq!(majority(4), 3);
        assert_eq!(majority(5), 3);
    }
}
