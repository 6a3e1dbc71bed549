//! Commit levels of a node: what a client's write waits for before it is
//! answered, and what happens when replicas do not answer in time.
//!
//! | level | the client is answered once the write is |
//! |---|---|
//! | `memory` | staged and applied here (not yet durable) |
//! | `local` | durable on this node's disk |
//! | `replicated(k)` | durable here and on `k` replicas (semi-synchronous) |
//! | `all` | durable here and on every replica this node has had since it started |
//! | `applied(k)` | durable here, and durable and readable on `k` replicas |
//!
//! A tidewal replica applies a record when it stages it, before it is
//! durable there, so a replica that acknowledges a record durable has
//! applied it too: `applied(k)` costs what `replicated(k)` costs.
//!
//! When the replicas do not acknowledge within `commit_timeout_ms`, the
//! node's `commit_policy` decides: `fail` answers the write with a
//! `-TIMEOUT` error naming the level reached (the write stays durable here
//! and may still reach the replicas: like a PostgreSQL commit whose wait for
//! its standby was cancelled, it is not undone); `degrade` answers it as a
//! success at the level reached, counts it, raises an alert, and stops
//! waiting for replicas until enough of them have caught up again. Either
//! way `CLIENT RECEIPT` tells the client the level its last write reached.
//! A write is never reported at a level it did not reach.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Shared;
use crate::engine::CommitLevel;

/// What a write waits for before its client is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Commit {
    Memory,
    #[default]
    Local,
    /// Durable here and on this many replicas.
    Replicated(u32),
    /// Durable here and on every replica known to this node.
    All,
    /// Durable here, and durable and applied on this many replicas.
    Applied(u32),
}

impl Commit {
    /// The level the engine itself is asked for.
    pub fn engine_level(self) -> CommitLevel {
        match self {
            Commit::Memory => CommitLevel::Memory,
            _ => CommitLevel::Local,
        }
    }

    /// Whether the level waits for replicas.
    pub fn needs_replicas(self) -> bool {
        matches!(
            self,
            Commit::Replicated(_) | Commit::All | Commit::Applied(_)
        )
    }
}

impl fmt::Display for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Commit::Memory => f.write_str("memory"),
            Commit::Local => f.write_str("local"),
            Commit::Replicated(k) => write!(f, "replicated({k})"),
            Commit::All => f.write_str("all"),
            Commit::Applied(k) => write!(f, "applied({k})"),
        }
    }
}

/// A commit level that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown commit level '{0}': the levels are memory, local, replicated(k), all and applied(k)"
)]
pub struct BadLevel(pub String);

impl FromStr for Commit {
    type Err = BadLevel;

    fn from_str(text: &str) -> Result<Self, BadLevel> {
        let bad = || BadLevel(text.to_string());
        let lower = text.trim().to_ascii_lowercase();
        let counted = |name: &str| -> Option<Result<u32, BadLevel>> {
            let rest = lower.strip_prefix(name)?;
            if rest.is_empty() {
                return Some(Ok(1));
            }
            let k = rest.strip_prefix('(')?.strip_suffix(')')?;
            Some(match k.trim().parse::<u32>() {
                Ok(k) if k >= 1 => Ok(k),
                _ => Err(bad()),
            })
        };
        match lower.as_str() {
            "memory" => Ok(Commit::Memory),
            "local" => Ok(Commit::Local),
            "all" => Ok(Commit::All),
            _ => {
                if let Some(k) = counted("replicated") {
                    Ok(Commit::Replicated(k?))
                } else if let Some(k) = counted("applied") {
                    Ok(Commit::Applied(k?))
                } else {
                    Err(bad())
                }
            }
        }
    }
}

impl Serialize for Commit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Commit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a write whose replicas do not answer in time gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutPolicy {
    /// An error naming the level reached.
    #[default]
    Fail,
    /// Success at the level reached, reported as degraded.
    Degrade,
}

impl fmt::Display for TimeoutPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutPolicy::Fail => "fail",
            TimeoutPolicy::Degrade => "degrade",
        })
    }
}

/// Wakes what waits on replicas when acknowledgements arrive: a write is
/// woken only once enough replicas hold it (each ack checks every waiting
/// write, under one lock, instead of waking them all to check themselves);
/// other tasks (`next_ack`) at every ack.
#[derive(Default)]
pub(super) struct AckSignal {
    waiters: Mutex<Vec<Arc<Waiter>>>,
    wakers: Mutex<Vec<Waker>>,
}

/// A write waiting for replicas.
struct Waiter {
    written: BTreeMap<u32, u64>,
    commit: Commit,
    want: usize,
    ready: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl AckSignal {
    /// Called after downstream positions changed (an ack, a disconnect).
    pub fn notify(&self, shared: &Shared) {
        let wakers = match self.wakers.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => Vec::new(),
        };
        for waker in wakers {
            waker.wake();
        }
        let Ok(mut waiters) = self.waiters.lock() else {
            return;
        };
        if waiters.is_empty() {
            return;
        }
        let Ok(downstreams) = shared.downstreams.lock() else {
            return;
        };
        waiters.retain(|w| {
            if holding_in(&downstreams, &w.written, w.commit) < w.want && !shared.stopping() {
                return true;
            }
            w.ready.store(true, Ordering::Release);
            if let Some(waker) = w.waker.lock().ok().and_then(|mut x| x.take()) {
                waker.wake();
            }
            false
        });
    }

    fn remove(&self, waiter: &Arc<Waiter>) {
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.retain(|w| !Arc::ptr_eq(w, waiter));
        }
    }
}

/// Resolves at the next acknowledgement (upstream side) or applied batch
/// (replica side).
pub(super) async fn next_ack(shared: &Shared) {
    let mut registered = false;
    std::future::poll_fn(|cx| {
        if registered {
            return Poll::Ready(());
        }
        registered = true;
        if let Ok(mut w) = shared.ack_signal.wakers.lock() {
            if w.len() > 4096 {
                // Left by waits that timed out: wake them (spuriously) so the
                // list stays small.
                w.drain(..).for_each(Waker::wake);
            }
            w.push(cx.waker().clone());
        }
        Poll::Pending
    })
    .await
}

/// The node's degraded state (`degrade` policy): since when, and for how
/// many replicas it waits to leave it.
#[derive(Debug, Default)]
pub(super) struct Degraded {
    pub since: Option<Instant>,
    /// Replicas that must be in sync again to leave the state.
    pub want: usize,
    /// The level that degraded was `all` (every replica counts then, not
    /// only those `Downstream::counts` lets count).
    pub all: bool,
    /// Writes answered below their level, in total.
    pub writes: u64,
    /// Writes that failed their level (`fail` policy), in total.
    pub failed: u64,
}

/// A write's level was not reached in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Shortfall {
    pub asked: Commit,
    pub acked: usize,
    pub wanted: usize,
    pub waited: Duration,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TIMEOUT {} not reached in {} ms: {} of {} replicas acknowledged; the write is durable on this node (level reached: local) and may still reach replicas",
            self.asked,
            self.waited.as_millis(),
            self.acked,
            self.wanted
        )
    }
}

/// How many replicas `commit` needs, given the replicas known.
fn wanted(shared: &Shared, commit: Commit) -> usize {
    match commit {
        Commit::Replicated(k) | Commit::Applied(k) => k as usize,
        Commit::All => shared
            .downstreams
            .lock()
            .map(|d| d.values().filter(|d| d.refused.is_none()).count())
            .unwrap_or(0)
            .max(1),
        Commit::Memory | Commit::Local => 0,
    }
}

/// Replicas that hold every record below `written` (shard → LSN of a
/// record): durable there, or for `applied` applied there too.
fn holding(shared: &Shared, written: &BTreeMap<u32, u64>, commit: Commit) -> usize {
    match shared.downstreams.lock() {
        Ok(downstreams) => holding_in(&downstreams, written, commit),
        Err(_) => 0,
    }
}

fn holding_in(
    downstreams: &BTreeMap<String, super::replication::Downstream>,
    written: &BTreeMap<u32, u64>,
    commit: Commit,
) -> usize {
    let applied = matches!(commit, Commit::Applied(_));
    // `all` waits for every replica; a count of them only for those whose
    // copy survives a failover (see `Downstream::counts`).
    let all = matches!(commit, Commit::All);
    downstreams
        .values()
        .filter(|d| d.connected && d.refused.is_none() && (all || d.counts))
        .filter(|d| {
            written.iter().all(|(shard, lsn)| {
                let i = *shard as usize;
                let verified = d.verified.get(i).copied().unwrap_or(false);
                let flushed = verified && d.flushed.get(i).is_some_and(|f| f > lsn);
                flushed && (!applied || d.applied.get(i).is_some_and(|a| a > lsn))
            })
        })
        .count()
}

/// How many connected replicas have made durable every record at or below
/// `written` (what `WAIT` counts).
pub(super) fn replicas_having(shared: &Shared, written: &BTreeMap<u32, u64>) -> usize {
    holding(shared, written, Commit::Replicated(1))
}

/// Waits until the replicas `commit` asks for hold the records of
/// `written`, or `limit` passes (`None`: for ever). `Ok` with the level
/// reached, or the shortfall.
pub(super) async fn replicas_reached(
    shared: &Shared,
    written: &BTreeMap<u32, u64>,
    commit: Commit,
    limit: Option<Duration>,
) -> Result<Commit, Shortfall> {
    let want = wanted(shared, commit);
    let started = Instant::now();
    let done = if holding(shared, written, commit) >= want {
        true
    } else {
        let waiter = Arc::new(Waiter {
            written: written.clone(),
            commit,
            want,
            ready: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        if let Ok(mut w) = shared.ack_signal.waiters.lock() {
            w.push(waiter.clone());
        }
        let reached = std::future::poll_fn(|cx| {
            if let Ok(mut w) = waiter.waker.lock() {
                *w = Some(cx.waker().clone());
            }
            // Checked after the waker is in place: an ack in between wakes.
            if waiter.ready.load(Ordering::Acquire)
                || holding(shared, written, commit) >= want
                || shared.stopping()
            {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let done = match limit {
            Some(limit) => glommio::timer::timeout(limit, async {
                reached.await;
                Ok(())
            })
            .await
            .is_ok(),
            None => {
                reached.await;
                true
            }
        };
        shared.ack_signal.remove(&waiter);
        done
    };
    let acked = holding(shared, written, commit);
    if done && acked >= want {
        Ok(commit)
    } else {
        Err(Shortfall {
            asked: commit,
            acked,
            wanted: want,
            waited: started.elapsed(),
        })
    }
}

/// After the engine made a write durable here: waits for the replicas its
/// level needs, under the node's policy. `Ok(level reached)`, or the error
/// reply of the `fail` policy.
pub(super) async fn settle(
    shared: &Shared,
    written: &BTreeMap<u32, u64>,
    commit: Commit,
) -> Result<Commit, Shortfall> {
    if !commit.needs_replicas() {
        return Ok(commit);
    }
    let config = &shared.config;
    let limit = Duration::from_millis(config.commit_timeout_ms);
    let degrade = config.commit_policy == TimeoutPolicy::Degrade;
    if degrade && shared.degraded.lock().is_ok_and(|d| d.since.is_some()) {
        // Degraded: replicas are not waited for until enough catch up.
        let reached = if holding(shared, written, commit) >= wanted(shared, commit) {
            commit
        } else {
            Commit::Local
        };
        if reached != commit
            && let Ok(mut d) = shared.degraded.lock()
        {
            d.writes += 1;
        }
        return Ok(reached);
    }
    match replicas_reached(shared, written, commit, Some(limit)).await {
        Ok(level) => Ok(level),
        Err(short) => {
            if let Ok(mut d) = shared.degraded.lock() {
                if degrade {
                    d.writes += 1;
                    if d.since.is_none() {
                        tracing::warn!(level = %commit, acked = short.acked, wanted = short.wanted,
                            "replicas did not acknowledge in time: commits degrade to local until they catch up");
                        d.since = Some(Instant::now());
                        d.want = short.wanted;
                        d.all = commit == Commit::All;
                    }
                } else {
                    d.failed += 1;
                }
            }
            if degrade {
                Ok(Commit::Local)
            } else {
                Err(short)
            }
        }
    }
}

/// Called when acknowledgements arrive: leaves the degraded state once
/// enough replicas have everything that was sent to them.
pub(super) fn maybe_recover(shared: &Shared) {
    let Ok(mut d) = shared.degraded.lock() else {
        return;
    };
    if d.since.is_none() {
        return;
    }
    let in_sync = shared
        .downstreams
        .lock()
        .map(|ds| {
            ds.values()
                .filter(|x| x.connected && x.refused.is_none() && (d.all || x.counts))
                .filter(|x| x.flushed == x.sent)
                .count()
        })
        .unwrap_or(0);
    if in_sync >= d.want.max(1) {
        tracing::info!("replicas caught up: commits wait for them again");
        d.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica that holds shard 0 up to lsn 1000 and shard 1 up to 500.
    fn holding_replica() -> super::super::replication::Downstream {
        super::super::replication::Downstream {
            connected: true,
            verified: vec![true, true],
            written: vec![1000, 500],
            flushed: vec![1000, 500],
            applied: vec![1000, 500],
            counts: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_replica_outside_the_failover_peers_counts_only_for_all() {
        let mut all = BTreeMap::new();
        let outside = super::super::replication::Downstream {
            counts: false,
            ..holding_replica()
        };
        all.insert("r".to_string(), outside);
        let write = BTreeMap::from([(0, 800)]);
        assert_eq!(holding_in(&all, &write, Commit::Replicated(1)), 0);
        assert_eq!(holding_in(&all, &write, Commit::Applied(1)), 0);
        assert_eq!(holding_in(&all, &write, Commit::All), 1);
        all.insert("peer".to_string(), holding_replica());
        assert_eq!(holding_in(&all, &write, Commit::Replicated(1)), 1);
        assert_eq!(holding_in(&all, &write, Commit::Applied(1)), 1);
        assert_eq!(holding_in(&all, &write, Commit::All), 2);
    }

    #[test]
    fn a_shard_swapped_here_counts_no_replica_until_it_is_verified_again() {
        let mut all = BTreeMap::new();
        all.insert("r".to_string(), holding_replica());
        let write = |shard: u32, lsn: u64| BTreeMap::from([(shard, lsn)]);
        assert_eq!(holding_in(&all, &write(0, 800), Commit::Replicated(1)), 1);
        // This node rewound shard 0 (or installed a snapshot there): what
        // the replica held was of the old log.
        super::super::replication::forget_positions(&mut all, 0);
        assert_eq!(holding_in(&all, &write(0, 800), Commit::Replicated(1)), 0);
        assert_eq!(holding_in(&all, &write(0, 800), Commit::Applied(1)), 0);
        // The other shard is untouched.
        assert_eq!(holding_in(&all, &write(1, 400), Commit::Replicated(1)), 1);
        // Verified again (its link read on from a position whose chain
        // matches), it counts once its acks say so.
        all.get_mut("r").unwrap().verified[0] = true;
        assert_eq!(holding_in(&all, &write(0, 800), Commit::Replicated(1)), 0);
        all.get_mut("r").unwrap().flushed[0] = 900;
        assert_eq!(holding_in(&all, &write(0, 800), Commit::Replicated(1)), 1);
    }

    #[test]
    fn levels_parse_and_print_back() {
        for (text, level) in [
            ("memory", Commit::Memory),
            ("local", Commit::Local),
            ("LOCAL", Commit::Local),
            ("replicated", Commit::Replicated(1)),
            ("replicated(2)", Commit::Replicated(2)),
            ("all", Commit::All),
            ("applied(3)", Commit::Applied(3)),
            ("applied", Commit::Applied(1)),
        ] {
            assert_eq!(text.parse::<Commit>(), Ok(level), "{text}");
            assert_eq!(level.to_string().parse::<Commit>(), Ok(level));
        }
        for bad in [
            "",
            "replicated(0)",
            "replicated(x)",
            "replicated(1",
            "sync",
            "all(2)",
        ] {
            assert!(bad.parse::<Commit>().is_err(), "{bad}");
        }
    }
}
