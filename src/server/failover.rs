//! Automatic failover: when a replica stops hearing its primary, the data
//! nodes elect a new one, which first gathers every record a majority
//! holds, then starts a new epoch; the others, and the old primary when it
//! comes back, follow it.
//!
//! The rules (ARCHITECTURE.md, Failover), with `n` the data nodes this node
//! knows (its peers and itself):
//!
//! 1. A replica that has heard no primary for the election timeout, plus a
//!    random part of it, first
//!    asks its peers who is primary (`TIDEWAL.WHO`): one in an epoch at
//!    least its own log's (and its fence) is followed. Otherwise, unless configured never to
//!    stand (`failover_candidate = false`), it asks whether a majority would
//!    vote for it (a pre-vote, which takes nothing and stops nothing: a
//!    node that alone lost its link, or whose link is busy re-syncing, goes
//!    on following), and if so stands in epoch `T`, one above every epoch
//!    it has seen or voted in. It hears a primary through its upstream's
//!    frames (records or heartbeats); an upstream that is itself a replica
//!    says in each heartbeat how long it has heard none (less one
//!    heartbeat interval, the gap every link has), and that counts as the
//!    cascade's silence too; except when the upstream is the candidate
//!    asking for its vote, whose standing says it heard none.
//! 2. Standing, it votes for itself, durably, stops following (it acks
//!    nothing more to the old primary), and asks every peer for its vote
//!    (`TIDEWAL.VOTE`). A peer grants one vote per epoch, kept durably
//!    before it answers, and only when: it is not a primary itself (unless
//!    the candidate's log is in a newer epoch than its own: then its epoch
//!    is over, and it votes and stands by), it too has heard no primary
//!    for the election timeout (so a node that cannot reach
//!    the primary does not depose one that others still hear), and the
//!    candidate's log is in no older epoch than its own. Granting, it stops
//!    following as well, and answers with its durable position and epoch
//!    per shard, read after it stopped and what it staged is durable:
//!    nothing past it was or will be acknowledged to the old primary by
//!    this node. From then on it follows no node whose log is in an older
//!    epoch than the one it voted in (its fence, kept with the vote).
//! 3. With a majority of `n` (itself included), the candidate fetches from
//!    the voters, shard by shard, the records the newest of their logs
//!    (epoch, then length; those in an older epoch than its own are passed
//!    over) holds past its own (`TIDEWAL.FETCH`, each batch checked against
//!    its chain as a stream's is); a shard as long as that log but in an
//!    older epoch ends the election. It checks it has not voted for a newer
//!    epoch meanwhile, then begins epoch `T` and takes writes. A write
//!    acknowledged at `replicated(k)` is durable on `k` replicas; when
//!    `k + 1` is a majority of `n`, every majority holds one of them, so
//!    the winner has it. Writes acknowledged at lower levels may be lost in
//!    a failover; the old primary keeps them aside when it rejoins.
//! 4. A primary asks its peers who is primary every election timeout: one
//!    in a higher epoch deposes it; it follows that node, and, refused as
//!    diverged (it took writes the new primary never had), re-syncs
//!    automatically: its log is rewound to the fork and the cut records are
//!    kept in a quarantine file. A node re-syncs by itself only from a
//!    primary in a newer epoch than its own log: only such a primary is
//!    sure to hold every write acknowledged in older ones.
//! 5. A node configured as a primary that, at start, has a shard in an
//!    epoch it did not begin, or a fence above its log's epoch, stands by as
//!    a replica instead of leading.
//!
//! A candidate that does not win follows its upstream again (its vote for
//! itself told no one anything); a node that voted for another waits for
//! a primary of that epoch or later, or stands itself. Neither goes back to
//! a primary of an older epoch than its fence: that is what keeps an old
//! primary from acknowledging, through them, writes the winner never saw.
//!
//! `tests/failover_model.rs` checks these rules exhaustively (stateright)
//! within small bounds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};

use super::Shared;
use super::resp::{Reply, parse_reply};
use crate::engine::CommitLevel;
use crate::format::Expect;

pub(super) const VOTE_COMMAND: &[u8] = b"TIDEWAL.VOTE";
pub(super) const WHO_COMMAND: &[u8] = b"TIDEWAL.WHO";
pub(super) const FETCH_COMMAND: &[u8] = b"TIDEWAL.FETCH";
pub(super) const PEERS_COMMAND: &[u8] = b"TIDEWAL.PEERS";

/// In the data directory: `VOTE_EPOCH CANDIDATE FENCE`.
const VOTE_FILE: &str = "vote";

/// Records a `TIDEWAL.FETCH` answers with, about (at least one record).
const FETCH_BYTES: usize = 1 << 20;

/// The longest reply a node takes from another: a fetch of one record of
/// the largest size the WAL allows, and then some.
const REPLY_BYTES_MAX: usize = 64 << 20;

/// What this node knows of elections.
#[derive(Debug, Default)]
pub(super) struct Failover {
    /// The other data nodes (`HOST:PORT` of their client ports).
    pub peers: Vec<String>,
    /// Each peer's node id, as its `TIDEWAL.WHO` last said: the replicas
    /// that count toward `replicated(k)` are found by it (`counts_for_commit`).
    pub peer_ids: std::collections::BTreeMap<String, String>,
    /// The highest epoch this node voted in, and for whom.
    pub vote_epoch: u64,
    pub voted_for: String,
    /// The highest epoch in which this node gave its vote to another node
    /// or began as the winner: it follows no upstream whose log is older
    /// (`may_follow`). A candidate's vote for itself does not raise it: it
    /// told no one its positions, and after a loss it may follow its old
    /// upstream again. Kept in `VOTE_FILE` with the vote.
    pub fence: u64,
    /// The highest epoch a peer refusing a vote said it had voted in or
    /// seen: the next election is above it.
    pub heard_epoch: u64,
    /// Set while a winner begins its epoch: no vote is given meanwhile
    /// (a node that begins epoch `T` has not voted for `T + 1`).
    pub promoting: Option<u64>,
    /// Since when this node has stopped following because it voted, stood
    /// or stands by (`None`: it follows its upstream, or is a primary).
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
    /// Time since this node last heard a primary: since the last frame from
    /// its upstream (or since it began to follow it, or stopped following),
    /// plus how long that upstream had itself heard none at its last
    /// heartbeat. A primary's heartbeats say zero; a cascaded replica's
    /// upstream, a replica, says how long its own primary has been silent,
    /// so the cascade does not take the heartbeats of a replica for a
    /// live primary (it would refuse its vote to every candidate).
    fn silence(&self, heard: Heard) -> Duration {
        since_latest([self.since, heard.last_frame, self.stopped], heard)
    }

    /// [`Failover::silence`] without the time it stopped following: how
    /// long since it last heard a primary, which goes on growing after it
    /// voted or stood.
    fn primary_silence(&self, heard: Heard) -> Duration {
        since_latest([self.since, heard.last_frame, None], heard)
    }
}

fn since_latest(instants: [Option<Instant>; 3], heard: Heard) -> Duration {
    instants
        .into_iter()
        .flatten()
        .max()
        .map_or(Duration::MAX, |t| {
            t.elapsed().saturating_add(heard.upstream_silence)
        })
}

/// What this node last heard from its upstream, for [`Failover::silence`].
#[derive(Clone, Copy, Default)]
struct Heard {
    last_frame: Option<Instant>,
    upstream_silence: Duration,
}

fn heard(shared: &Shared) -> Heard {
    shared
        .upstream
        .lock()
        .map(|u| Heard {
            last_frame: u.last_frame,
            upstream_silence: u.upstream_silence,
        })
        .unwrap_or_default()
}

/// How long since this node last heard a primary: zero on a primary; on a
/// replica, since its upstream's last frame (or since it began to follow)
/// plus what that upstream's last heartbeat said, also after it stopped
/// following. `None`: it never heard one.
pub(super) fn primary_silence(shared: &Shared) -> Option<Duration> {
    if !shared.is_replica() {
        return Some(Duration::ZERO);
    }
    let heard = heard(shared);
    let silence = shared.failover.lock().ok()?.primary_silence(heard);
    (silence != Duration::MAX).then_some(silence)
}

/// What this node's heartbeats tell its downstreams, in milliseconds:
/// [`primary_silence`] less one heartbeat interval, the gap every link
/// has between two heartbeats. Without that, silences added hop by hop
/// would reach a 1 s election timeout in a two-link cascade whose primary
/// is up (500 ms on each link). `u64::MAX`: it never heard one.
pub(super) fn primary_silence_ms(shared: &Shared) -> u64 {
    primary_silence(shared).map_or(u64::MAX, |d| {
        u64::try_from(d.saturating_sub(super::replication::HEARTBEAT).as_millis())
            .unwrap_or(u64::MAX)
    })
}

/// Loads the vote kept in the data directory; one that cannot be read
/// is an error (the node would forget a vote and its fence).
pub(super) fn load_vote(shared: &Shared) -> Result<(), String> {
    let path = shared.config.data_dir.join(VOTE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    let number = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
    match (number(0), words.get(1), number(2)) {
        (Some(epoch), Some(candidate), Some(fence)) if words.len() == 3 => {
            if let Ok(mut f) = shared.failover.lock() {
                f.vote_epoch = epoch;
                f.voted_for = candidate.to_string();
                f.fence = fence;
            }
            Ok(())
        }
        _ => Err(format!(
            "{} is not `VOTE_EPOCH CANDIDATE FENCE`: this node would forget its vote (fix or remove it by hand)",
            path.display()
        )),
    }
}

/// Before an operator's promotion (`REPLICAOF NO ONE`): the epoch it
/// begins is above every epoch this node voted in or heard of.
pub(super) async fn before_promotion(shared: &Shared) -> Result<(), crate::engine::EngineError> {
    let floor = shared
        .failover
        .lock()
        .map(|f| f.vote_epoch.max(f.heard_epoch).max(f.fence))
        .unwrap_or(0);
    if floor == 0 {
        return Ok(());
    }
    for shard in 0..shared.engine.shard_count() {
        shared.engine.raise_epoch_floor(shard, floor).await?;
    }
    Ok(())
}

/// Makes the vote and fence as they are in memory now durable (file, then
/// directory) on glommio's blocking thread. Writers take turns, and each
/// writes the newest state, so the file never goes back to an older vote.
async fn keep_vote(shared: &Arc<Shared>) -> Result<(), String> {
    static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let shared = shared.clone();
    glommio::executor()
        .spawn_blocking(move || {
            let _turn = WRITING.lock().unwrap_or_else(|p| p.into_inner());
            let text = match shared.failover.lock() {
                Ok(f) => format!("{} {} {}\n", f.vote_epoch, f.voted_for, f.fence),
                Err(_) => return Err(std::io::Error::other("poisoned")),
            };
            let dir = &shared.config.data_dir;
            let path = dir.join(VOTE_FILE);
            let tmp = dir.join("vote.tmp");
            std::fs::write(&tmp, text)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        })
        .await
        .map_err(|e| format!("keeping the vote: {e}"))
}

/// Whether `addr` names this node's client port: its own address, or,
/// on its port, a loopback address or (when it listens on every address)
/// one of this host's.
pub(super) fn is_own_address(shared: &Shared, addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Some(a) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    let listen = shared.listen;
    a == listen
        || (a.port() == listen.port()
            && (a.ip().is_loopback()
                || (listen.ip().is_unspecified()
                    // Only a local address can be bound.
                    && std::net::UdpSocket::bind((a.ip(), 0)).is_ok())))
}

/// `HOST:PORT`, by its form (the host need not resolve yet).
pub(super) fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// Sets the peers, without this node; returns them.
pub(super) fn set_peers(shared: &Shared, peers: &[String]) -> Vec<String> {
    let peers: Vec<String> = peers
        .iter()
        .filter(|p| {
            let own = is_own_address(shared, p);
            if own {
                tracing::info!(peer = %p, "a peer names this node: left out");
            }
            !p.is_empty() && !own
        })
        .cloned()
        .collect();
    if let Ok(mut f) = shared.failover.lock() {
        f.peers = peers.clone();
        f.peer_ids.retain(|p, _| peers.contains(p));
    }
    recount(shared);
    peers
}

/// Whether a replica's acknowledgements count toward `replicated(k)`,
/// `applied(k)` and `WAIT`: always without peers; with them (failover on),
/// only a peer's. The winner of an election gathers what a majority of the
/// peers hold: a write held only by a replica that does not vote could be
/// lost in a failover, so it must not be acknowledged as replicated.
pub(super) fn counts_for_commit(shared: &Shared, node_id: &str) -> bool {
    shared
        .failover
        .lock()
        .map(|f| f.peers.is_empty() || f.peer_ids.values().any(|id| id == node_id))
        .unwrap_or(false)
}

/// Sets each downstream's `counts` again (the peers or their ids changed)
/// and wakes the writes waiting for replicas.
fn recount(shared: &Shared) {
    // `downstreams` first, then `failover` inside it (the order a link
    // that attaches takes them in): two recounts at once cannot leave the
    // older reading of the peers last.
    if let Ok(mut downstreams) = shared.downstreams.lock() {
        let Ok(f) = shared.failover.lock() else {
            return;
        };
        for d in downstreams.values_mut() {
            d.counts = f.peers.is_empty() || f.peer_ids.values().any(|id| *id == d.node_id);
        }
    }
    shared.ack_signal.notify(shared);
}

/// Notes the node ids that peers' `TIDEWAL.WHO` answers carry.
fn note_ids(shared: &Shared, answers: &[(String, Result<Reply, String>)]) {
    let mut changed = false;
    if let Ok(mut f) = shared.failover.lock() {
        for (peer, answer) in answers {
            if let Some(id) = who_node_id(answer)
                && f.peers.contains(peer)
                && f.peer_ids.get(peer) != Some(&id)
            {
                f.peer_ids.insert(peer.clone(), id);
                changed = true;
            }
        }
    }
    if changed {
        recount(shared);
    }
}

/// Whether some peer's node id is not known yet.
fn ids_unknown(shared: &Shared) -> bool {
    shared
        .failover
        .lock()
        .is_ok_and(|f| f.peers.iter().any(|p| !f.peer_ids.contains_key(p)))
}

/// Asks every peer `TIDEWAL.WHO` for its node id.
async fn learn_ids(shared: &Shared, limit: Duration) {
    let answers = ask_all(&peers(shared), vec![WHO_COMMAND.to_vec()], limit).await;
    note_ids(shared, &answers);
}

pub(super) fn peers(shared: &Shared) -> Vec<String> {
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

/// The highest epoch any shard here has held or seen (floors included).
fn seen_epoch(stats: &[crate::engine::ShardStats]) -> u64 {
    stats
        .iter()
        .map(|s| s.epoch.max(s.epoch_floor))
        .max()
        .unwrap_or(0)
}

/// Stops following the upstream (a vote was given or asked): the follower
/// ends and acks nothing more (`send_acks` checks the generation before
/// each ack it writes, `follow_once` before its Hello). The node stays a
/// read-only replica.
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

/// Makes this node a read-only replica that follows no one yet: a primary
/// that learns its epoch is over, or one restarted as a primary whose log
/// is in an epoch another node began. It takes no write from now on; it
/// finds the primary (`TIDEWAL.WHO`) or is elected.
pub(super) fn stand_by(shared: &Shared, why: String) {
    tracing::warn!(%why, "standing by as a replica");
    if let Ok(mut r) = shared.replica_of.lock() {
        r.clear();
    }
    shared.replica.store(true, Ordering::Release);
    stop_following(shared, why);
}

/// At start, with peers: a node configured as a primary whose log is in an
/// epoch it did not begin (it was a replica in a later epoch than the one
/// it first led, or it never led) does not take writes in it: another node
/// is, or was, that epoch's primary.
pub(super) fn check_start_as_primary(shared: &Shared) -> Result<(), crate::engine::EngineError> {
    if shared.is_replica() || shared.config.peers.is_empty() {
        return Ok(());
    }
    let stats = &crate::engine::block_on(shared.engine.stats())?;
    let fence = shared.failover.lock().map(|f| f.fence).unwrap_or(0);
    // Epoch 1 is a new log's: the node configured as the primary led it.
    let other = stats.iter().find(|s| s.epoch > s.epoch_begun.max(1));
    let why = if let Some(s) = other {
        format!(
            "configured as a primary, but its shard {} is in epoch {}, which another node began (this node began {} last)",
            s.shard, s.epoch, s.epoch_begun
        )
    } else if fence > log_epoch(stats) {
        format!(
            "configured as a primary, but it voted for another node in epoch {fence}, newer than its log's"
        )
    } else {
        return Ok(());
    };
    stand_by(
        shared,
        format!("{why}: following the primary its peers name, or standing in an election"),
    );
    Ok(())
}

/// Argument `i` of an election command as a number: a decimal as Redis
/// takes one (`conn::parse_i64`), not negative.
fn arg_u64(args: &[Bytes], i: usize) -> Option<u64> {
    super::conn::parse_i64(&args[i]).and_then(|n| u64::try_from(n).ok())
}

/// `TIDEWAL.VOTE epoch candidate candidate_log_epoch [PRE]`: grants or
/// refuses this node's vote. A grant carries each shard's durable LSN and
/// the epoch of its last record; a refusal, the highest epoch this node has
/// voted in or seen. With `PRE`, only says whether it would, taking nothing.
pub(super) async fn vote(shared: Arc<Shared>, args: Vec<Bytes>) -> Reply {
    let number = |i: usize| arg_u64(&args, i);
    let (Some(epoch), Some(their_log)) = (number(1), number(3)) else {
        return Reply::err("TIDEWAL.VOTE epoch candidate log-epoch: epochs are numbers");
    };
    let candidate = String::from_utf8_lossy(&args[2]).to_string();
    if !is_host_port(&candidate) || candidate.contains(char::is_whitespace) {
        return Reply::err("TIDEWAL.VOTE: the candidate is not HOST:PORT");
    }
    let pre = match args.get(4) {
        None => false,
        Some(a) if a.eq_ignore_ascii_case(b"PRE") && args.len() == 5 => true,
        Some(_) => return Reply::err("TIDEWAL.VOTE epoch candidate log-epoch [PRE]"),
    };
    let refuse = |why: String, known: u64| {
        Reply::Array(vec![
            Reply::Int(0),
            Reply::Simple(why),
            Reply::Int(known as i64),
        ])
    };
    let Ok(stats) = shared.engine.stats().await else {
        return refuse("this node's engine is closed".into(), 0);
    };
    let ours = log_epoch(&stats);
    let seen = seen_epoch(&stats);
    let timeout = Duration::from_millis(shared.config.election_timeout_ms);
    let heard = heard(&shared);
    let was_primary;
    {
        let Ok(mut f) = shared.failover.lock() else {
            return refuse("poisoned".into(), 0);
        };
        was_primary = !shared.is_replica();
        let here = Here {
            primary: was_primary,
            promoting: f.promoting.is_some(),
            vote_epoch: f.vote_epoch,
            voted_for: &f.voted_for,
            // What it hears through the candidate itself (a cascade asked
            // by its upstream) says nothing: the candidate stands because
            // it heard no primary for the timeout.
            hears_upstream: !was_primary
                && f.stopped.is_none()
                && f.silence(heard) < timeout
                && shared.replica_of() != candidate,
            // The figures were read before the lock: a node that has just
            // won knows its epoch from its fence (raised before it leads).
            log_epoch: ours.max(if was_primary { f.fence } else { 0 }),
            seen: seen.max(f.fence),
        };
        if let Some(why) = refusal(&here, epoch, &candidate, their_log) {
            return refuse(why, f.vote_epoch.max(seen));
        }
        if pre {
            // Asked whether it would: nothing is taken, nothing stops.
            return Reply::Array(vec![Reply::Int(1), Reply::Simple("would grant".into())]);
        }
        // Taken at once, under the lock: a second candidate in this epoch
        // is refused even while this vote is being made durable.
        f.vote_epoch = epoch;
        f.voted_for = candidate.clone();
        f.fence = f.fence.max(epoch);
    }
    let why = format!("stopped following: voted for {candidate} in epoch {epoch}");
    if was_primary {
        // A primary of an older epoch than the candidate's log: its epoch
        // is over.
        stand_by(&shared, why);
    } else {
        stop_following(&shared, why);
    }
    if let Err(e) = keep_vote(&shared).await {
        return refuse(e, epoch);
    }
    tracing::warn!(%candidate, epoch, "voted in an election");
    // Positions read after the follower stopped, once what it staged is
    // durable: nothing past them is acknowledged upstream by this node,
    // and the candidate may fetch all of them.
    // Within half the timeout, so that the grant reaches the candidate
    // before it gives up (it waits the whole timeout).
    let positions = durable_positions(&shared, timeout / 2).await;
    let Ok(stats) = positions else {
        return refuse("this node's engine is closed".into(), epoch);
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
        Reply::Array(stats.iter().map(|s| Reply::Int(s.epoch as i64)).collect()),
    ])
}

/// Every shard's figures once what was staged when it was called is
/// durable (or `limit` has passed).
async fn durable_positions(
    shared: &Shared,
    limit: Duration,
) -> Result<Vec<crate::engine::ShardStats>, crate::engine::EngineError> {
    // An empty batch queues behind whatever a link staged (staging is
    // first come, first served).
    for shard in 0..shared.engine.shard_count() {
        shared
            .engine
            .replicate_at(shard, Bytes::new(), CommitLevel::Memory)
            .await?;
    }
    let started = Instant::now();
    loop {
        let stats = shared.engine.stats().await?;
        let durable = stats.iter().all(|s| s.durable_lsn >= s.next_lsn);
        if durable || started.elapsed() >= limit {
            return Ok(stats);
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// What a node asked for its vote goes by.
struct Here<'a> {
    primary: bool,
    /// It is beginning the epoch it won.
    promoting: bool,
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
    if here.primary && their_log <= here.log_epoch {
        // A primary whose epoch is as new as any the candidate has seen is
        // up; one behind the candidate's log is stale, and votes.
        Some(format!(
            "this node is the primary, in epoch {}, and is up",
            here.log_epoch
        ))
    } else if here.promoting {
        Some("this node is beginning the epoch it was elected in".into())
    } else if epoch <= here.vote_epoch && !again {
        Some(format!(
            "voted in epoch {} already (for {})",
            here.vote_epoch, here.voted_for
        ))
    } else if here.hears_upstream {
        Some(
            "this node hears its upstream, and through it a primary, within the election timeout"
                .into(),
        )
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
        Reply::Bulk(Bytes::from(shared.node_id.clone())),
    ])
}

/// `TIDEWAL.FETCH shard lsn chain epoch`: durable records of `shard` from
/// `lsn` on, which must continue `(chain, epoch)`; empty when there are
/// none.
pub(super) async fn fetch(shared: Arc<Shared>, args: Vec<Bytes>) -> Reply {
    let number = |i: usize| arg_u64(&args, i);
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
pub(super) async fn call(addr: &str, args: &[&[u8]], limit: Duration) -> Result<Reply, String> {
    let work = async {
        let mut stream = super::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut out = BytesMut::new();
        super::resp::encode_array_header(args.len(), &mut out);
        for a in args {
            Reply::Bulk(Bytes::copy_from_slice(a)).encode(&mut out);
        }
        stream
            .write_all(&out)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let mut input = Vec::new();
        let mut buf = vec![0; 64 << 10];
        loop {
            match parse_reply(&input, REPLY_BYTES_MAX).map_err(|e| format!("{addr}: {e}"))? {
                Some((reply, _)) => return Ok(reply),
                None if input.len() > REPLY_BYTES_MAX + 1024 => {
                    return Err(format!("{addr} answered more than {REPLY_BYTES_MAX} bytes"));
                }
                None => {
                    let n = stream
                        .read(&mut buf)
                        .await
                        .map_err(|e| format!("{addr}: {e}"))?;
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

/// Asks every peer at once, and returns each answer with its peer.
async fn ask_all(
    peers: &[String],
    args: Vec<Vec<u8>>,
    limit: Duration,
) -> Vec<(String, Result<Reply, String>)> {
    let args = std::rc::Rc::new(args);
    let asks: Vec<_> = peers
        .iter()
        .map(|p| {
            let (p, args) = (p.clone(), args.clone());
            glommio::spawn_local(async move {
                let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                let answer = call(&p, &refs, limit).await;
                (p, answer)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for ask in asks {
        answers.push(ask.await);
    }
    answers
}

/// A `TIDEWAL.WHO` answer: whether the node is a primary, and its log's
/// epoch.
fn who_answer(answer: &Result<Reply, String>) -> Option<(bool, u64)> {
    match answer {
        Ok(Reply::Array(a)) => match a.as_slice() {
            [Reply::Bulk(role), Reply::Int(e), ..] => {
                Some((role.as_ref() == b"primary", u64::try_from(*e).ok()?))
            }
            _ => None,
        },
        _ => None,
    }
}

/// The node id a `TIDEWAL.WHO` answer carries (its fourth element).
fn who_node_id(answer: &Result<Reply, String>) -> Option<String> {
    match answer {
        Ok(Reply::Array(a)) => match a.get(3) {
            Some(Reply::Bulk(id)) if !id.is_empty() => {
                Some(String::from_utf8_lossy(id).into_owned())
            }
            _ => None,
        },
        _ => None,
    }
}

/// The primary in the highest epoch at or above `min_epoch` that a peer
/// says it is (`TIDEWAL.WHO`), with that epoch.
async fn primary_at_least(
    shared: &Shared,
    min_epoch: u64,
    limit: Duration,
) -> Option<(String, u64)> {
    let answers = ask_all(&peers(shared), vec![WHO_COMMAND.to_vec()], limit).await;
    note_ids(shared, &answers);
    let mut best: Option<(String, u64)> = None;
    for (peer, answer) in answers {
        if let Some((true, e)) = who_answer(&answer)
            && e >= min_epoch
            && best.as_ref().is_none_or(|(_, b)| e > *b)
        {
            best = Some((peer, e));
        }
    }
    best
}

/// Whether this node may follow `upstream`: always, unless it has given
/// its vote to another node (or won) in some epoch, and then only an
/// upstream whose log is in that epoch or a later one (asked with
/// `TIDEWAL.WHO`). Raft's rule that a node which has seen a term rejects
/// leaders of older ones.
pub(super) async fn may_follow(shared: &Shared, upstream: &str) -> Result<(), String> {
    let fence = shared.failover.lock().map(|f| f.fence).unwrap_or(0);
    if fence == 0 {
        return Ok(());
    }
    let limit = Duration::from_millis(shared.config.election_timeout_ms);
    let answer = Ok(call(upstream, &[WHO_COMMAND], limit).await?);
    match who_answer(&answer) {
        Some((_, e)) if e >= fence => Ok(()),
        Some((_, e)) => Err(format!(
            "not following {upstream}: its log is in epoch {e}, and this node voted in epoch {fence}"
        )),
        None => Err(format!("{upstream} answered TIDEWAL.WHO with {answer:?}")),
    }
}

/// Follows `upstream` (a primary elected in a failover, or the one this
/// node followed before a lost election); refused as diverged by it, this
/// node re-syncs by itself (see `follow`).
fn rejoin(shared: &Arc<Shared>, upstream: &str, epoch: u64, why: &str) {
    tracing::warn!(%upstream, epoch, "following {upstream} ({why})");
    let generation = shared.set_upstream(upstream);
    if let Ok(mut f) = shared.failover.lock() {
        f.rejoin = upstream.to_string();
        f.rejoin_resynced = false;
        f.last = Some(serde_json::json!({
            "outcome": why,
            "primary": upstream,
            "epoch": epoch,
        }));
    }
    glommio::spawn_local(super::replication::follow(
        shared.clone(),
        upstream.to_string(),
        generation,
    ))
    .detach();
}

/// Whether a follower refused by `upstream` should re-sync by itself
/// (rewind, or take a snapshot, keeping what it cuts in quarantine): the
/// node follows it because of a failover, has not tried yet, and
/// `upstream` is a primary in a newer epoch than this node's log (than
/// its oldest shard's: the one refused is not in the upstream's). Only
/// such a primary is sure to hold every acknowledged write of the older
/// epochs (its election gathered them); a replica, or a primary of the
/// same epoch, may simply be behind this node.
pub(super) async fn resync_after_refusal(shared: &Shared, upstream: &str) -> bool {
    {
        let Ok(f) = shared.failover.lock() else {
            return false;
        };
        if f.rejoin != upstream || f.rejoin_resynced {
            return false;
        }
    }
    // Per shard: a shard that took the new primary's records is in its
    // epoch already, while the diverged one is in an older one.
    let ours = shared.engine.stats().await.map_or(u64::MAX, |s| {
        s.iter().map(|s| s.epoch).min().unwrap_or(u64::MAX)
    });
    let limit = Duration::from_millis(shared.config.election_timeout_ms);
    let answer = call(upstream, &[WHO_COMMAND], limit).await;
    let newer = matches!(who_answer(&answer), Some((true, e)) if e > ours);
    if !newer {
        tracing::warn!(%upstream, ours, ?answer, "refused, but the upstream is not a primary of a newer epoch than this node's log: not re-syncing by itself");
        return false;
    }
    let Ok(mut f) = shared.failover.lock() else {
        return false;
    };
    let first = !f.rejoin_resynced;
    f.rejoin_resynced = true;
    first
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
    // The last time it asked its peers who is primary (none yet).
    let mut last_check: Option<Instant> = None;
    // The last time it asked for the node ids of peers it had none for.
    let mut last_ids: Option<Instant> = None;
    let asking_ids = std::rc::Rc::new(std::cell::Cell::new(false));
    let due = |last: Option<Instant>, every: Duration| last.is_none_or(|t| t.elapsed() >= every);
    while !shared.stopping() {
        glommio::timer::sleep(tick).await;
        if peers(&shared).is_empty() {
            continue;
        }
        if ids_unknown(&shared) && due(last_ids, tick * 2) && !asking_ids.get() {
            // Apart from this loop: a peer that does not answer must not
            // hold back an election.
            last_ids = Some(Instant::now());
            asking_ids.set(true);
            let (shared, asking) = (shared.clone(), asking_ids.clone());
            glommio::spawn_local(async move {
                learn_ids(&shared, timeout).await;
                asking.set(false);
            })
            .detach();
        }
        // This node's log epoch, asked of the engine only when needed.
        let our_epoch = || async { shared.engine.stats().await.map(|s| log_epoch(&s)) };
        if !shared.is_replica() {
            // A primary: deposed by one in a newer epoch?
            if due(last_check, timeout) {
                last_check = Some(Instant::now());
                let Ok(ours) = our_epoch().await else {
                    return;
                };
                if let Some((primary, epoch)) = primary_at_least(&shared, ours + 1, timeout).await
                    && !shared.is_replica()
                {
                    rejoin(&shared, &primary, epoch, "deposed by a newer primary");
                }
            }
            continue;
        }
        let heard = heard(&shared);
        let (silence, stopped, fence) = match shared.failover.lock() {
            Ok(f) => (f.silence(heard), f.stopped.is_some(), f.fence),
            Err(_) => return,
        };
        if silence < timeout && !stopped {
            continue;
        }
        let Ok(ours) = our_epoch().await else {
            return;
        };
        // Silent or stopped: a primary at least as new as this node's log
        // (and as the epoch it voted in) is followed.
        if due(last_check, tick * 2) || silence >= wait {
            last_check = Some(Instant::now());
            if let Some((primary, epoch)) =
                primary_at_least(&shared, ours.max(fence), timeout).await
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

/// What a vote round gathered: the peers that granted, with each shard's
/// `(durable lsn, epoch)`; and the highest epoch a refusing peer knew.
#[derive(Default)]
struct Round {
    granted: Vec<(String, Vec<(u64, u64)>)>,
    known: u64,
}

/// Asks every peer for its vote (or, `pre`, whether it would give it).
async fn ask(
    peers: &[String],
    epoch: u64,
    me: &str,
    ours: u64,
    pre: bool,
    limit: Duration,
) -> Round {
    let mut args = vec![
        VOTE_COMMAND.to_vec(),
        epoch.to_string().into_bytes(),
        me.as_bytes().to_vec(),
        ours.to_string().into_bytes(),
    ];
    if pre {
        args.push(b"PRE".to_vec());
    }
    let mut round = Round::default();
    for (peer, answer) in ask_all(peers, args, limit).await {
        let int = |r: &Reply| match r {
            Reply::Int(n) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        };
        match answer {
            Ok(Reply::Array(a)) => match a.as_slice() {
                [Reply::Int(1), _] if pre => round.granted.push((peer, Vec::new())),
                [Reply::Int(1), _, Reply::Array(lsns), Reply::Array(epochs)] if !pre => {
                    let shards = lsns.iter().map(int).zip(epochs.iter().map(int)).collect();
                    round.granted.push((peer, shards));
                }
                [Reply::Int(0), Reply::Simple(why), known] => {
                    round.known = round.known.max(int(known));
                    tracing::info!(%peer, %why, epoch, pre, "vote refused");
                }
                other => tracing::info!(%peer, ?other, "unexpected answer to a vote"),
            },
            other => tracing::info!(%peer, ?other, pre, "no vote"),
        }
    }
    round
}

/// Stands in an election; on a win, becomes the primary.
async fn stand(shared: &Arc<Shared>, timeout: Duration) {
    let Ok(stats) = shared.engine.stats().await else {
        return;
    };
    let me = shared.listen.to_string();
    let peers = peers(shared);
    let needed = majority(peers.len() + 1);
    let next = |f: &Failover, seen: u64| seen.max(f.vote_epoch).max(f.heard_epoch).checked_add(1);
    let note = |what: &str, epoch: u64, votes: usize| {
        if let Ok(mut f) = shared.failover.lock() {
            f.last = Some(serde_json::json!({
                "outcome": what,
                "epoch": epoch,
                "votes": votes,
                "candidate": me,
            }));
        }
    };
    // Pre-vote: would a majority vote in the next epoch? Nothing is taken
    // and this node goes on following meanwhile, so one that alone lost
    // its link (or whose link is busy re-syncing) neither stops nor
    // raises epochs.
    let Some(epoch) = shared
        .failover
        .lock()
        .ok()
        .and_then(|f| next(&f, seen_epoch(&stats)))
    else {
        return;
    };
    let round = ask(&peers, epoch, &me, log_epoch(&stats), true, timeout).await;
    if let Ok(mut f) = shared.failover.lock() {
        f.heard_epoch = f.heard_epoch.max(round.known);
    }
    let would = round.granted.len() + 1;
    if would < needed {
        tracing::info!(
            epoch,
            would,
            needed,
            "pre-vote: not enough peers would vote"
        );
        note("not standing: a pre-vote found no majority", epoch, would);
        return;
    }
    let previous = shared.replica_of();
    stop_following(shared, "stopped following: standing in an election".into());
    // Read again now that nothing is being taken from the upstream: the
    // epoch is above everything this node has seen.
    let Ok(stats) = durable_positions(shared, timeout).await else {
        return;
    };
    let ours = log_epoch(&stats);
    let Some(epoch) = ({
        let Ok(mut f) = shared.failover.lock() else {
            return;
        };
        let epoch = next(&f, seen_epoch(&stats));
        if let Some(epoch) = epoch {
            f.vote_epoch = epoch;
            f.voted_for = me.clone();
            f.elections += 1;
        }
        epoch
    }) else {
        return;
    };
    if let Err(e) = keep_vote(shared).await {
        note(&e, epoch, 0);
        return;
    }
    tracing::warn!(
        epoch,
        needed,
        "the upstream is silent: standing in an election"
    );
    let round = ask(&peers, epoch, &me, ours, false, timeout).await;
    let votes = round.granted.len() + 1;
    if let Ok(mut f) = shared.failover.lock() {
        f.heard_epoch = f.heard_epoch.max(round.known);
    }
    let lost = |why: String| {
        tracing::warn!(epoch, votes, needed, %why, "not elected");
        note(&why, epoch, votes);
        // Its own vote told no one anything: it may follow its upstream
        // again (unless it gave its vote to another meanwhile: `may_follow`).
        if !previous.is_empty() && shared.is_replica() && !shared.stopping() {
            rejoin(
                shared,
                &previous,
                epoch,
                "not elected; following the upstream again",
            );
        }
    };
    if votes < needed {
        lost("not elected".into());
        return;
    }
    if let Err(e) = gather(shared, &round.granted, timeout).await {
        lost(format!("elected, but could not gather the records: {e}"));
        return;
    }
    // Still this node's election? (It grants votes for newer epochs while
    // it stands.) From here on it grants none until it has begun.
    {
        let Ok(mut f) = shared.failover.lock() else {
            return;
        };
        if f.vote_epoch != epoch || f.voted_for != me || shared.stopping() || !shared.is_replica() {
            drop(f);
            note(
                "elected, but voted in a newer epoch meanwhile",
                epoch,
                votes,
            );
            return;
        }
        f.promoting = Some(epoch);
    }
    let begun = begin_elected(shared, epoch).await;
    if let Ok(mut f) = shared.failover.lock()
        && let Ok(begun) = begun
    {
        f.fence = f.fence.max(begun);
    }
    // Leading (or not) before `promoting` is cleared: a vote asked
    // meanwhile sees a primary of this epoch.
    if begun == Ok(epoch) {
        shared.set_upstream("");
    }
    if let Ok(mut f) = shared.failover.lock() {
        f.promoting = None;
    }
    match begun {
        Ok(begun) if begun == epoch => {
            if let Ok(mut f) = shared.failover.lock() {
                f.won += 1;
            }
            let _ = keep_vote(shared).await;
            note(&format!("elected; primary in epoch {begun}"), epoch, votes);
            tracing::warn!(epoch = begun, votes, "elected: promoted to primary");
            on_promote(shared, begun, "elected");
        }
        Ok(begun) => {
            // Its floor rose meanwhile (a frame taken as it stopped): an
            // epoch it was not elected in is not led. Elections go on.
            let _ = keep_vote(shared).await;
            note(
                &format!("elected in epoch {epoch}, but began {begun}: not leading it"),
                epoch,
                votes,
            );
            tracing::error!(
                epoch,
                begun,
                "began another epoch than the one elected in: not leading"
            );
        }
        Err(e) => note(
            &format!("elected, but could not begin the epoch: {e}"),
            epoch,
            votes,
        ),
    }
}

/// Runs the configured `on_promote` command, if any, on a thread of its
/// own: the node does not wait for it (a hook that hangs delays nothing),
/// and logs how it ended.
pub(super) fn on_promote(shared: &Shared, epoch: u64, reason: &'static str) {
    let command = shared.config.on_promote.clone();
    if command.is_empty() {
        return;
    }
    let (listen, node_id) = (shared.listen.to_string(), shared.node_id.clone());
    let spawned = std::thread::Builder::new()
        .name("on-promote".into())
        .spawn(move || {
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .env("TIDEWAL_LISTEN", &listen)
                .env("TIDEWAL_NODE_ID", &node_id)
                .env("TIDEWAL_EPOCH", epoch.to_string())
                .env("TIDEWAL_REASON", reason)
                .stdin(std::process::Stdio::null())
                .status();
            match status {
                Ok(s) if s.success() => tracing::info!(%command, epoch, "on_promote ran"),
                Ok(s) => tracing::error!(%command, epoch, status = %s, "on_promote failed"),
                Err(e) => tracing::error!(%command, epoch, error = %e, "on_promote did not start"),
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "on_promote: no thread to run it");
    }
}

/// Begins, on every shard, the epoch this node was elected in (at least).
async fn begin_elected(shared: &Shared, epoch: u64) -> Result<u64, String> {
    for shard in 0..shared.engine.shard_count() {
        shared
            .engine
            .raise_epoch_floor(shard, epoch - 1)
            .await
            .map_err(|e| e.to_string())?;
    }
    shared.follow_generation.fetch_add(1, Ordering::AcqRel);
    shared.engine.begin_epoch().await.map_err(|e| e.to_string())
}

/// Fetches, shard by shard, what the voter furthest ahead holds past this
/// node's log, and makes it durable here. Voters whose shard is in an
/// older epoch than this node's are passed over: their tail past this
/// node's log was never acknowledged (a newer epoch began without it).
async fn gather(
    shared: &Shared,
    voters: &[(String, Vec<(u64, u64)>)],
    limit: Duration,
) -> Result<(), String> {
    let engine = &shared.engine;
    let start = engine.stats().await.map_err(|e| e.to_string())?;
    for s in &start {
        let shard = s.shard;
        // The newest log first (epoch, then length), as Raft compares.
        let Some((peer, (target, their_epoch))) = voters
            .iter()
            .filter_map(|(p, shards)| shards.get(shard as usize).map(|x| (p, *x)))
            .filter(|(_, (_, epoch))| *epoch >= s.epoch)
            .max_by_key(|(_, (lsn, epoch))| (*epoch, *lsn))
        else {
            continue;
        };
        loop {
            let stats = engine.stats().await.map_err(|e| e.to_string())?;
            let Some(s) = stats.iter().find(|s| s.shard == shard) else {
                return Err(format!("shard {shard} is not open"));
            };
            if s.next_lsn >= target && s.epoch >= their_epoch {
                break;
            }
            if s.next_lsn >= target {
                // As long as the voter's, but in an older epoch: this
                // shard's tail is one a newer epoch began without (never
                // acknowledged), and the voter's newer records are not
                // here. Not electable without a re-sync first.
                return Err(format!(
                    "shard {shard} here ends at {} in epoch {}, {peer}'s at {target} in epoch {their_epoch}: this node holds an older epoch's tail",
                    s.next_lsn, s.epoch
                ));
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
/// config's `peers` at start), then lists them. Names are resolved (to
/// leave this node out) on glommio's blocking thread: a slow DNS server
/// does not stall the executor's clients and shards.
pub(super) async fn peers_command(shared: Arc<Shared>, args: Vec<Bytes>) -> Reply {
    if args.len() > 1 {
        let list: Vec<String> = args[1..]
            .iter()
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        if let Some(bad) = list.iter().find(|p| !is_host_port(p)) {
            return Reply::err(format!("TIDEWAL.PEERS: {bad:?} is not HOST:PORT"));
        }
        let setting = shared.clone();
        glommio::executor()
            .spawn_blocking(move || {
                set_peers(&setting, &list);
            })
            .await;
        // Their node ids, before the answer: until a peer's is known, its
        // acknowledgements do not count toward `replicated(k)`.
        learn_ids(
            &shared,
            Duration::from_millis(shared.config.election_timeout_ms),
        )
        .await;
    }
    Reply::Array(
        peers(&shared)
            .into_iter()
            .map(|p| Reply::Bulk(p.into()))
            .collect(),
    )
}

/// The status page's `failover` object.
pub(super) fn status(shared: &Shared) -> serde_json::Value {
    let silence = primary_silence(shared).and_then(|d| u64::try_from(d.as_millis()).ok());
    let Ok(f) = shared.failover.lock() else {
        return serde_json::Value::Null;
    };
    serde_json::json!({
        "enabled": !f.peers.is_empty(),
        "peers": f.peers,
        "peer_ids": f.peer_ids,
        "election_timeout_ms": shared.config.election_timeout_ms,
        "candidate": shared.config.failover_candidate,
        "vote_epoch": f.vote_epoch,
        "voted_for": f.voted_for,
        "fence_epoch": f.fence,
        "stopped_seconds": f.stopped.map(|t| t.elapsed().as_secs_f64()),
        "primary_silence_ms": silence,
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
            promoting: false,
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
        // A primary behind the candidate's log is stale: its epoch is over,
        // and it votes (then stands by).
        assert_eq!(refusal(&primary, 9, c, 3), None);
        let promoting = Here {
            promoting: true,
            ..replica()
        };
        assert!(refusal(&promoting, 9, c, 2).unwrap().contains("beginning"));
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
