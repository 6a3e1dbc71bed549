//! `TIDEWAL.BACKUP`: a backup of every shard, taken on the node asked
//! (a replica, so that the primary does no work for it), and
//! `TIDEWAL.CUT`, the consistent cut it ends at.
//!
//! The node answers `+BACKUP <cluster id> <shards>`, then, shard by shard,
//! takes a snapshot (the state at the shard's applied position: what a
//! replica holds is a prefix of the primary's log) and sends it as the
//! replication stream sends one to a re-syncing replica: `Snapshot` frames
//! and a `SnapshotEnd` with the position it stands for. The snapshots are
//! taken one after another, so on their own they stand at different
//! moments. So that the backup is one moment of the whole data set, the
//! node then asks the primary for a consistent cut (`TIDEWAL.CUT`, through
//! its upstream; [`crate::engine::Engine::cut`]) and sends, per shard, the
//! records from its snapshot's position up to the cut (`Records` frames)
//! and a `Cut` frame, once its own log has them. `tidewal restore` installs
//! each snapshot and replays its records: every shard ends at the cut. A
//! replica that cannot reach its upstream sends its own heads instead
//! (flagged in the `Cut` frames): not one moment of the primary's.
//! Then it closes the connection. A failure (the node stopping included)
//! is a `Refuse` frame with the reason. The backup is not a downstream:
//! the node holds no WAL for it and counts it toward no commit level. Its
//! snapshots join the node's own (the two newest are kept, as after a
//! periodic snapshot) but release no WAL. `tidewal backup` is the client,
//! `tidewal restore` makes a data directory of what it received
//! (FORMAT.md, Backup).

use std::sync::Arc;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use std::time::{Duration, Instant};

use zerocopy::IntoBytes;

use super::Shared;
use super::replication::{frame, send_snapshot};
use super::resp::Reply;
use crate::engine::EngineError;
use crate::format::{Expect, FrameKind, SnapshotEnd};

pub(super) const BACKUP_COMMAND: &[u8] = b"TIDEWAL.BACKUP";
pub(super) const CUT_COMMAND: &[u8] = b"TIDEWAL.CUT";

/// How long a backup waits for this node's log to reach the cut.
const CUT_WAIT: Duration = Duration::from_secs(60);

/// How long a node waits for its upstream's answer to `TIDEWAL.CUT`.
const CUT_ASK: Duration = Duration::from_secs(10);

/// Most replicas a `TIDEWAL.CUT` is passed up through (a cycle of
/// upstreams, which a misconfiguration could make, ends there).
const CUT_HOPS_MAX: u64 = 16;

/// Sends the backup on `stream` (after the `+BACKUP` line), then closes it.
pub(super) async fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    if let Err(why) = send(&mut stream, &shared).await {
        tracing::warn!(%why, "backup failed");
        let _ = stream
            .write_all(&frame(FrameKind::Refuse, 0, 0, 0, why.as_bytes()))
            .await;
    }
    let _ = stream.close().await;
}

/// Numbers the backups under way (`Shared::backup_holds`).
static NEXT_BACKUP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A backup's hold on the WAL from its snapshots on, while it runs.
struct Hold<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Hold<'_> {
    fn set(&self, shard: u32, lsn: u64) {
        if let Ok(mut b) = self.shared.backup_holds.lock() {
            b.entry(self.id).or_default().insert(shard, lsn);
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if let Ok(mut b) = self.shared.backup_holds.lock() {
            b.remove(&self.id);
        }
    }
}

async fn send(stream: &mut TcpStream, shared: &Shared) -> Result<(), String> {
    let started = std::time::Instant::now();
    let mut snapshots = Vec::new();
    // Periodic snapshots meanwhile release no record it still sends.
    let hold = Hold {
        shared,
        id: NEXT_BACKUP.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    };
    for shard in 0..shared.engine.shard_count() {
        let lsn = snapshot(shared, shard).await?;
        // The snapshot sent is this one or a newer one.
        hold.set(shard, lsn);
        let epoch = shared
            .engine
            .stats()
            .await
            .map_err(|e| e.to_string())?
            .get(shard as usize)
            .map_or(0, |s| s.epoch);
        let at = send_snapshot(shared, shard, epoch, stream, true).await?;
        tracing::info!(shard, lsn, sent = at.lsn, "backup: shard sent");
        snapshots.push(at);
    }
    // Asked after every snapshot was taken: each is then at or below the
    // primary's head, so the cut is reached by records alone. A replica
    // that cannot ask (its primary is down: a backup may be wanted most
    // then) stands in with its own heads, and says so.
    let (cut, own) = match cut(shared, 0).await {
        Ok(cut) => (cut, false),
        Err(why) => {
            tracing::warn!(%why, "backup: no consistent cut from the primary; this node's own heads stand in");
            let own = shared
                .engine
                .cut()
                .await
                .map_err(|e| format!("taking a cut: {e}"))?;
            (own, true)
        }
    };
    if cut.len() != snapshots.len() {
        return Err(format!(
            "the primary's cut has {} shards, this node {}",
            cut.len(),
            snapshots.len()
        ));
    }
    for (shard, (from, to)) in snapshots.into_iter().zip(&cut).enumerate() {
        let shard = shard as u32;
        let bytes = send_tail(shared, stream, shard, from, *to).await?;
        let end = SnapshotEnd {
            file_bytes: bytes.into(),
            lsn: to.lsn.into(),
            epoch: to.epoch.into(),
            chain: to.chain.into(),
            reserved: u32::from(own).into(),
        };
        stream
            .write_all(&frame(FrameKind::Cut, shard, to.epoch, 0, end.as_bytes()))
            .await
            .map_err(|e| e.to_string())?;
    }
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "backup sent");
    Ok(())
}

/// The consistent cut: this node's own on a primary, its upstream's
/// (asked on, up to the primary) on a replica. `hops`: replicas it came
/// through.
async fn cut(shared: &Shared, hops: u64) -> Result<Vec<Expect>, String> {
    if !shared.is_replica() {
        return shared
            .engine
            .cut()
            .await
            .map_err(|e| format!("taking a cut: {e}"));
    }
    if hops >= CUT_HOPS_MAX {
        return Err(format!(
            "passed through {hops} replicas without reaching a primary: do the upstreams form a cycle?"
        ));
    }
    let upstream = shared.replica_of();
    let hops = (hops + 1).to_string();
    let answer = super::failover::call(&upstream, &[CUT_COMMAND, hops.as_bytes()], CUT_ASK).await?;
    let bad = || format!("{upstream} answered TIDEWAL.CUT with {answer:?}");
    let Reply::Array(shards) = &answer else {
        return Err(match &answer {
            Reply::Error(e) => format!("{upstream} could not take a cut: {e}"),
            _ => bad(),
        });
    };
    let number = |r: &Reply| match r {
        Reply::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    shards
        .iter()
        .map(|s| match s {
            Reply::Array(v) if v.len() == 3 => Some(Expect {
                lsn: number(&v[0])?,
                chain: u32::try_from(number(&v[1])?).ok()?,
                epoch: number(&v[2])?,
            }),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)
}

/// `TIDEWAL.CUT [hops]`: `[[lsn, chain, epoch] per shard]`, a consistent
/// cut of the primary's logs (asked of the primary through the upstream on
/// a replica; `hops` counts the replicas it came through).
pub(super) async fn cut_command(shared: Arc<Shared>, args: Vec<bytes::Bytes>) -> Reply {
    let hops = match args.get(1) {
        None => 0,
        Some(h) => match super::conn::parse_i64(h).and_then(|n| u64::try_from(n).ok()) {
            Some(h) => h,
            None => return Reply::err("TIDEWAL.CUT [hops]: hops is a number"),
        },
    };
    match cut(&shared, hops).await {
        Ok(cut) => Reply::Array(
            cut.iter()
                .map(|e| {
                    Reply::Array(vec![
                        Reply::Int(e.lsn as i64),
                        Reply::Int(e.chain as i64),
                        Reply::Int(e.epoch as i64),
                    ])
                })
                .collect(),
        ),
        Err(why) => Reply::err(format!("TIDEWAL.CUT: {why}")),
    }
}

/// Sends `shard`'s records from `from` (its snapshot's position) up to
/// `to` (the cut) as `Records` frames, once this node's log has them
/// durable; returns their bytes.
async fn send_tail(
    shared: &Shared,
    stream: &mut TcpStream,
    shard: u32,
    mut from: Expect,
    to: Expect,
) -> Result<u64, String> {
    if from.lsn > to.lsn {
        return Err(format!(
            "shard {shard}: this node's snapshot at lsn {} is past the primary's cut at {}: its log is not the primary's",
            from.lsn, to.lsn
        ));
    }
    let started = Instant::now();
    let mut sent = 0u64;
    while from.lsn < to.lsn {
        if shared.stopping() {
            return Err("the node is stopping".into());
        }
        let left = CUT_WAIT.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(format!(
                "shard {shard}: this node did not reach the primary's cut at lsn {} within {} s (it is at {})",
                to.lsn,
                CUT_WAIT.as_secs(),
                from.lsn
            ));
        }
        let batch = shared
            .engine
            .read_log_wait(shard, from, 1 << 20, left.min(Duration::from_secs(1)))
            .await
            .map_err(|e| format!("shard {shard}: reading the log at lsn {}: {e}", from.lsn))?;
        // Whole records up to the cut (a record boundary of the primary's
        // log, so of this one's too).
        let (start, mut bytes) = (from.lsn, 0usize);
        for r in &batch.records {
            let end = r.lsn + r.encoded.len() as u64;
            if end > to.lsn {
                break;
            }
            bytes += r.encoded.len();
            from = Expect {
                lsn: end,
                chain: r.checksum,
                epoch: r.epoch,
            };
        }
        if bytes > 0 {
            stream
                .write_all(&frame(
                    FrameKind::Records,
                    shard,
                    from.epoch,
                    start,
                    &batch.encoded[..bytes],
                ))
                .await
                .map_err(|e| e.to_string())?;
            sent += bytes as u64;
        } else if !batch.records.is_empty() {
            return Err(format!(
                "shard {shard}: no record of this node's log ends at the primary's cut (lsn {}): its log is not the primary's",
                to.lsn
            ));
        }
    }
    if from.lsn != to.lsn || from.chain != to.chain {
        return Err(format!(
            "shard {shard}: this node's log at lsn {} (chain {:08x}) is not the primary's at its cut (lsn {}, chain {:08x})",
            from.lsn, from.chain, to.lsn, to.chain
        ));
    }
    Ok(sent)
}

/// A snapshot of `shard` as it is now (the newest one may be far behind),
/// releasing no WAL (hold 0). One already being taken (a periodic one,
/// another backup's, a re-sync's) is waited out.
async fn snapshot(shared: &Shared, shard: u32) -> Result<u64, String> {
    loop {
        if shared.stopping() {
            return Err("the node is stopping".into());
        }
        match shared.engine.snapshot_shard(shard, 0).await {
            Ok(lsn) => return Ok(lsn),
            Err(EngineError::SnapshotInProgress) => {
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(format!(
                    "shard {shard}: taking a snapshot for the backup: {e}"
                ));
            }
        }
    }
}
