//! `TIDEWAL.BACKUP`: a backup of every shard, taken on the node asked
//! (a replica, so that the primary does no work for it).
//!
//! The node answers `+BACKUP <cluster id> <shards>`, then, shard by shard,
//! takes a snapshot (the state at the shard's applied position: what a
//! replica holds is a prefix of the primary's log) and sends it as the
//! replication stream sends one to a re-syncing replica: `Snapshot` frames
//! and a `SnapshotEnd` with the position it stands for. Then it closes the
//! connection. A failure (the node stopping included) is a `Refuse` frame
//! with the reason. The backup is not a downstream: the node holds no WAL
//! for it and counts it toward no commit level. Its snapshots join the
//! node's own (the two newest are kept, as after a periodic snapshot) but
//! release no WAL. `tidewal backup` is the client, `tidewal restore` makes
//! a data directory of what it received (FORMAT.md, Backup).

use std::sync::Arc;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use super::Shared;
use super::replication::{frame, send_snapshot};
use crate::engine::EngineError;
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
        let lsn = snapshot(shared, shard).await?;
        let epoch = shared
            .engine
            .stats()
            .await
            .map_err(|e| e.to_string())?
            .get(shard as usize)
            .map_or(0, |s| s.epoch);
        let at = send_snapshot(shared, shard, epoch, stream, true).await?;
        tracing::info!(shard, lsn, sent = at.lsn, "backup: shard sent");
    }
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "backup sent");
    Ok(())
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
