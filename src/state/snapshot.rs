//! Writing and loading snapshots of a [`StateMachine`] (format: FORMAT.md
//! and `format::snapshot`).
//!
//! Writing streams a frozen copy of the state (O(1) to take for `KvState`)
//! into 64 KiB checksummed blocks, written sequentially with O_DIRECT in
//! 1 MiB writes, so writes to the shard go on meanwhile. The header goes last,
//! then sync, rename into place, directory sync. Loading tries the newest
//! snapshot first and falls back to older ones when one does not verify,
//! saying which and why.

use bytes::Bytes;

use crate::format::{
    Expect, LogId, SNAPSHOT_BLOCK_BYTES, SNAPSHOT_PAYLOAD_BYTES, SnapshotHeader,
    decode_snapshot_block, encode_snapshot_block, parse_snapshot_file_name, snapshot_file_name,
};
use crate::io::{BLOCK_BYTES, IoError, Storage, StorageFile};

use super::StateMachine;

/// Bytes handed to one write.
const WRITE_BYTES: usize = 1 << 20;

/// Writes `state` (a frozen copy) as the snapshot at WAL position `pos`;
/// returns the file name once it is durable under that name.
pub async fn write_snapshot<S: Storage>(
    storage: &S,
    log: LogId,
    pos: Expect,
    state: &impl StateMachine,
) -> Result<String, IoError> {
    let name = snapshot_file_name(pos.lsn);
    let tmp = format!("{name}.tmp");
    let file = storage.create(&tmp).await?;
    let mut writer = BlockWriter {
        file: &file,
        offset: BLOCK_BYTES,
        index: 0,
        payload: Vec::with_capacity(SNAPSHOT_PAYLOAD_BYTES),
        out: Vec::with_capacity(WRITE_BYTES + SNAPSHOT_BLOCK_BYTES),
        stream_bytes: 0,
    };
    let mut entries = 0u64;
    for (key, value) in state.entries() {
        writer.push(&(key.len() as u32).to_le_bytes()).await?;
        writer.push(&(value.len() as u32).to_le_bytes()).await?;
        writer.push(key).await?;
        writer.push(value).await?;
        entries += 1;
    }
    let stream_bytes = writer.finish().await?;
    let header = SnapshotHeader::new(log, pos.lsn, pos.epoch, pos.chain, entries, stream_bytes);
    file.write_at(0, &[zerocopy::IntoBytes::as_bytes(&header)])
        .await?;
    file.sync().await?;
    drop(file);
    storage.rename(&tmp, &name).await?;
    storage.sync_dir().await?;
    Ok(name)
}

struct BlockWriter<'a, F> {
    file: &'a F,
    offset: u64,
    index: u64,
    payload: Vec<u8>,
    out: Vec<u8>,
    stream_bytes: u64,
}

impl<F: StorageFile> BlockWriter<'_, F> {
    async fn push(&mut self, mut bytes: &[u8]) -> Result<(), IoError> {
        self.stream_bytes += bytes.len() as u64;
        while !bytes.is_empty() {
            let n = (SNAPSHOT_PAYLOAD_BYTES - self.payload.len()).min(bytes.len());
            self.payload.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.payload.len() == SNAPSHOT_PAYLOAD_BYTES {
                self.seal_block();
                if self.out.len() >= WRITE_BYTES {
                    self.flush().await?;
                }
            }
        }
        Ok(())
    }

    fn seal_block(&mut self) {
        encode_snapshot_block(&mut self.out, self.index, &self.payload);
        self.index += 1;
        self.payload.clear();
    }

    async fn flush(&mut self) -> Result<(), IoError> {
        if !self.out.is_empty() {
            self.file.write_at(self.offset, &[&self.out]).await?;
            self.offset += self.out.len() as u64;
            self.out.clear();
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<u64, IoError> {
        if !self.payload.is_empty() {
            self.seal_block();
        }
        self.flush().await?;
        Ok(self.stream_bytes)
    }
}

/// A snapshot loaded into memory.
pub struct LoadedSnapshot<M> {
    pub name: String,
    pub state: M,
    /// Where WAL replay starts.
    pub pos: Expect,
}

/// The snapshots in `storage`, newest first, as `(lsn, name)`.
pub async fn list_snapshots<S: Storage>(storage: &S) -> Result<Vec<(u64, String)>, IoError> {
    let mut found: Vec<(u64, String)> = storage
        .list()
        .await?
        .into_iter()
        .filter_map(|n| parse_snapshot_file_name(&n).map(|lsn| (lsn, n)))
        .collect();
    found.sort_unstable_by_key(|(lsn, _)| std::cmp::Reverse(*lsn));
    Ok(found)
}

/// Loads the newest snapshot that verifies. Each one that does not is
/// returned in the second list with the reason, and logged.
pub async fn load_newest<S: Storage, M: StateMachine>(
    storage: &S,
    log: LogId,
) -> Result<(Option<LoadedSnapshot<M>>, Vec<(String, String)>), IoError> {
    let mut skipped = Vec::new();
    for (_, name) in list_snapshots(storage).await? {
        // An unreadable snapshot (EIO on a bad sector) is as good as a
        // damaged one: fall back to the next.
        let loaded = load(storage, log, &name)
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match loaded {
            Ok(loaded) => return Ok((Some(loaded), skipped)),
            Err(why) => {
                tracing::error!(snapshot = %name, %why, "snapshot does not verify; falling back to an older one");
                skipped.push((name, why));
            }
        }
    }
    Ok((None, skipped))
}

/// Whether the snapshot `name` loads (its header, every block, its entry
/// count): `Ok(Err(why))` when it does not.
pub async fn verify_snapshot<S: Storage, M: StateMachine>(
    storage: &S,
    log: LogId,
    name: &str,
) -> Result<Result<(), String>, IoError> {
    Ok(load::<S, M>(storage, log, name).await?.map(|_| ()))
}

/// Loads one snapshot: an I/O error is an error; damage is `Ok(Err(why))`.
async fn load<S: Storage, M: StateMachine>(
    storage: &S,
    log: LogId,
    name: &str,
) -> Result<Result<LoadedSnapshot<M>, String>, IoError> {
    let file = storage.open(name).await?;
    let head = file.read_at(0, BLOCK_BYTES as usize).await?;
    let header = match SnapshotHeader::decode(&head, log) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let stream_bytes = header.stream_bytes.get();
    let blocks = stream_bytes.div_ceil(SNAPSHOT_PAYLOAD_BYTES as u64);
    let mut parser = EntryParser::default();
    let mut state = M::default();
    let lsn = header.lsn.get();
    let mut index = 0u64;
    while index < blocks {
        let n = (blocks - index).min((WRITE_BYTES / SNAPSHOT_BLOCK_BYTES) as u64);
        let offset = BLOCK_BYTES + index * SNAPSHOT_BLOCK_BYTES as u64;
        let chunk = file
            .read_at(offset, n as usize * SNAPSHOT_BLOCK_BYTES)
            .await?;
        if chunk.len() < n as usize * SNAPSHOT_BLOCK_BYTES {
            return Ok(Err(format!(
                "truncated at block {}",
                index + chunk.len() as u64 / SNAPSHOT_BLOCK_BYTES as u64
            )));
        }
        for block in chunk.chunks(SNAPSHOT_BLOCK_BYTES) {
            let payload = match decode_snapshot_block(block, index) {
                Ok(p) => p,
                Err(e) => return Ok(Err(format!("block {index}: {e}"))),
            };
            if let Err(why) = parser.feed(payload, |k, v| state.restore(k, v, lsn)) {
                return Ok(Err(format!("block {index}: {why}")));
            }
            index += 1;
        }
    }
    if parser.entries != header.entries.get()
        || parser.bytes != stream_bytes
        || !parser.pending.is_empty()
    {
        return Ok(Err(
            "entry count or stream length differs from the header".into()
        ));
    }
    let pos = Expect {
        lsn,
        chain: header.chain.get(),
        epoch: header.epoch.get(),
    };
    Ok(Ok(LoadedSnapshot {
        name: name.to_string(),
        state,
        pos,
    }))
}

/// Cuts the entry stream back into entries across block boundaries.
#[derive(Default)]
struct EntryParser {
    pending: Vec<u8>,
    entries: u64,
    bytes: u64,
}

impl EntryParser {
    fn feed(
        &mut self,
        payload: &[u8],
        mut emit: impl FnMut(Bytes, Bytes),
    ) -> Result<(), &'static str> {
        self.bytes += payload.len() as u64;
        self.pending.extend_from_slice(payload);
        let mut at = 0;
        loop {
            let rest = &self.pending[at..];
            if rest.len() < 8 {
                break;
            }
            let key_len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let value_len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
            if key_len > super::KEY_BYTES_MAX || value_len > crate::format::RECORD_BODY_MAX {
                return Err("entry length out of range");
            }
            if rest.len() < 8 + key_len + value_len {
                break;
            }
            let key = Bytes::copy_from_slice(&rest[8..8 + key_len]);
            let value = Bytes::copy_from_slice(&rest[8 + key_len..8 + key_len + value_len]);
            emit(key, value);
            self.entries += 1;
            at += 8 + key_len + value_len;
        }
        self.pending.drain(..at);
        Ok(())
    }
}
