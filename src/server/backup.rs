//! `TIDEWAL.BACKUP`: a backup of every shard, taken on the node asked
//! (a replica, so that the primary does no work for it).
//!
//! The node answers `+BACKUP <cluster id> <shards>`, then, shard by shard,
//! takes a snapshot (the state at the shard's applied position: what a
//! replica holds is a prefix of the primary's log) and sends it as the
//! replication stream sends one to a re-syncing replica: `Snapshot` frames
//! and a `SnapshotEnd` with the position it stands for. Then it closes the
//! connection. A failure is a `Refuse` frame with the reason. Nothing else
//! changes on the node: it is not a downstream, holds no WAL for the
//! backup, and counts it toward no commit level. `tidewal backup` is the
//! client, `tidewal restore` makes a data directory of what it received
//! (FORMAT.md, Backup).

use std::sync::Arc;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use super::Shared;
use super::replication::{frame, send_snapshot};
use crate::format::FrameKind;

pub(super) const BACKUP_COMMAND: &[u8] = b"TIDEWAL.BACKUP";

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

async fn send(stream: &mut TcpStream, shared: &Shared) -> Result<(), String> {
    let started = std::time::Instant::now();
    for shard in 0..shared.engine.shard_count() {
        // A snapshot of now: the newest one may be far behind. It releases
        // WAL as a periodic snapshot does, never what replicas still need.
        let hold = super::retention_hold(shared, shard);
        let lsn = shared
            .engine
            .snapshot_shard(shard, hold)
            .await
            .map_err(|e| format!("shard {shard}: taking a snapshot for the backup: {e}"))?;
        let epoch = shared
            .engine
            .stats()
            .await
            .map_err(|e| e.to_string())?
            .get(shard as usize)
            .map_or(0, |s| s.epoch);
        let at = send_snapshot(shared, shard, epoch, stream).await?;
        tracing::info!(shard, lsn, sent = at.lsn, "backup: shard sent");
    }
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "backup sent");
    Ok(())
}
