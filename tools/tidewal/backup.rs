//! `tidewal backup` and `tidewal restore`: a backup taken from a running
//! node (a replica, so that the primary does no work for it), and a data
//! directory made of one.
//!
//! A backup is a directory: one snapshot file per shard, as the node's
//! `TIDEWAL.BACKUP` sent it (`src/server/backup.rs`), the records from
//! each snapshot's position up to the primary's consistent cut (one
//! `.tail` file per shard), and `BACKUP.json`, written last, naming each
//! file with its length, CRC32C and the log positions. Restored, every
//! shard stands at the cut: the data set as it was at one moment. A
//! directory without `BACKUP.json` is not a backup. Both commands work in a hidden sibling directory that takes the
//! target's place only when complete and durable, and is removed if they
//! fail. FORMAT.md, Backup.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde::{Deserialize, Serialize};
use tidewal::format::{
    Decoded, Expect, FRAME_HEADER_BYTES, FrameKind, LogId, RECORD_HEADER_BYTES, SnapshotEnd,
    SnapshotHeader, crc32c_append, decode_fixed, decode_frame, decode_record, frame_len,
};

/// The manifest of a backup directory.
const MANIFEST: &str = "BACKUP.json";

/// The largest frame payload taken: a snapshot piece is 1 MiB.
const PAYLOAD_MAX: usize = 4 << 20;

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The node to back up (its client port). Take it from a replica: the
    /// primary then does no work for it.
    #[arg(long, value_name = "HOST:PORT")]
    from: String,
    /// The directory to write the backup to (new, or empty).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// A directory written by `tidewal backup`.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// The data directory to make (new, or empty); then start `tidewal node
    /// --data-dir` on it.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Restore where O_DIRECT is not in effect (tmpfs): not durable.
    #[arg(long)]
    allow_buffered_io: bool,
}

#[derive(Serialize, Deserialize, Debug)]
struct Manifest {
    /// 2 with records to a consistent cut (`tail`), else 1.
    format: u32,
    /// The node it was taken from, as given.
    source: String,
    /// That node's replication cluster, 32 hex digits.
    cluster_id: String,
    /// When the node was asked, milliseconds since the Unix epoch.
    taken_unix_ms: u64,
    /// Every shard stands at the primary's consistent cut (one moment of
    /// the whole data set). False when the node could not ask its primary
    /// (its own heads stand in) and in backups from before cuts.
    #[serde(default)]
    consistent: bool,
    shards: Vec<ShardBackup>,
}

#[derive(Serialize, Deserialize, Debug)]
struct ShardBackup {
    shard: u32,
    /// The snapshot file, in the backup directory.
    file: String,
    bytes: u64,
    /// CRC32C of the whole file.
    crc32c: u32,
    /// The log position the snapshot stands for: the shard's state after
    /// every record below `lsn`.
    lsn: u64,
    epoch: u64,
    chain: u32,
    /// The records from `lsn` up to the consistent cut (absent in backups
    /// from before cuts were taken: their shards stand at different
    /// moments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tail: Option<TailBackup>,
}

/// A shard's records from its snapshot's position to the cut, as on disk.
#[derive(Serialize, Deserialize, Debug)]
struct TailBackup {
    file: String,
    bytes: u64,
    crc32c: u32,
    /// The cut: the shard's log ends here once the records are replayed.
    lsn: u64,
    epoch: u64,
    chain: u32,
}

/// In a data directory, while `tidewal restore` fills it: a node refuses
/// to start on it (`tidewal::server::RESTORING`).
const RESTORING: &str = tidewal::server::RESTORING;

/// Where the work is done. A target that does not exist yet is built as a
/// hidden sibling directory, which takes its place (a rename, then the
/// parent synced) only once complete and durable. One that exists (it must
/// be an empty directory: a mount point, a symlink's target, one made for
/// the service) is filled in place, since a rename would put the data
/// beside it, on another filesystem or instead of the link; there
/// `BACKUP.json` (written last) or the absence of `RESTORING` (removed
/// last, and a node refuses to start while it is there) says it is
/// complete. On failure what was made is removed; a run killed outright
/// leaves its hidden `.NAME.WHAT-PID` directory (or, in place, files
/// without `BACKUP.json` or with `RESTORING`) for the operator.
struct Staging {
    target: PathBuf,
    path: PathBuf,
    in_place: bool,
    marker: Option<&'static str>,
    done: bool,
}

impl Staging {
    fn new(target: &Path, what: &str, marker: Option<&'static str>) -> anyhow::Result<Staging> {
        // `dir/.` and `dir/` name `dir`.
        let target: PathBuf = target.components().collect();
        let in_place = target.exists();
        let path = if in_place {
            let mut entries =
                std::fs::read_dir(&target).with_context(|| format!("{}", target.display()))?;
            ensure!(
                entries.next().is_none(),
                "{} is not empty: nothing is overwritten",
                target.display()
            );
            target.clone()
        } else {
            let name = target
                .file_name()
                .with_context(|| format!("{}: not a directory name", target.display()))?;
            let path = target.with_file_name(format!(
                ".{}.{what}-{}",
                name.to_string_lossy(),
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            path
        };
        if let Some(marker) = marker {
            std::fs::write(path.join(marker), "")?;
            std::fs::File::open(path.join(marker))?.sync_all()?;
            sync_dir(&path)?;
        }
        Ok(Staging {
            target,
            path,
            in_place,
            marker,
            done: false,
        })
    }

    /// Makes the work `target`, durably.
    fn finish(mut self) -> anyhow::Result<()> {
        sync_dir(&self.path)?;
        if let Some(marker) = self.marker {
            std::fs::remove_file(self.path.join(marker))?;
            sync_dir(&self.path)?;
        }
        if self.in_place {
            self.done = true;
            return Ok(());
        }
        std::fs::rename(&self.path, &self.target).with_context(|| {
            format!(
                "moving {} to {}",
                self.path.display(),
                self.target.display()
            )
        })?;
        self.done = true;
        let parent = self
            .target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        sync_dir(parent)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if !self.in_place {
            let _ = std::fs::remove_dir_all(&self.path);
            return;
        }
        // It was empty: everything in it is this run's. The marker goes
        // last, so a node never starts on a half-removed restore.
        for entry in std::fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
        {
            if Some(entry.file_name().to_string_lossy().as_ref()) == self.marker {
                continue;
            }
            let p = entry.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
        if let Some(marker) = self.marker {
            let _ = std::fs::remove_file(self.path.join(marker));
        }
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Length and CRC32C of a file, read in pieces.
fn crc_of(path: &Path) -> anyhow::Result<(u64, u32)> {
    let mut file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let (mut len, mut crc) = (0u64, 0u32);
    let mut piece = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut piece)?;
        if n == 0 {
            return Ok((len, crc));
        }
        crc = crc32c_append(crc, &piece[..n]);
        len += n as u64;
    }
}

pub fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let staging = Staging::new(&args.to, "partial", None)?;
    let dir = staging.path.clone();
    let addr = args
        .from
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.from))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.from))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {}", args.from))?;
    // The node sends nothing while it snapshots a shard, which for a large
    // one takes a while; silence this long is a node gone.
    stream.set_read_timeout(Some(Duration::from_secs(30 * 60)))?;
    let taken_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (&stream).write_all(b"*1\r\n$14\r\nTIDEWAL.BACKUP\r\n")?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let mut line = Vec::new();
    (&mut reader).take(256).read_until(b'\n', &mut line)?;
    let line = String::from_utf8_lossy(&line).trim_end().to_string();
    if let Some(e) = line.strip_prefix('-') {
        bail!("{} refused the backup: {e}", args.from);
    }
    let words: Vec<&str> = line.split(' ').collect();
    let (cluster_id, shard_count) = match words.as_slice() {
        ["+BACKUP", cluster, n] if cluster.len() == 32 => (
            cluster.to_string(),
            n.parse::<u32>().context("shard count")?,
        ),
        _ => bail!(
            "{} does not speak TIDEWAL.BACKUP (an older tidewal, or not tidewal): {line:?}",
            args.from
        ),
    };
    let mut shards: Vec<ShardBackup> = Vec::new();
    let mut input: Vec<u8> = Vec::new();
    let mut file: Option<(u32, std::fs::File, u64, u32)> = None;
    // The next frame; `None` where the node closed the connection between
    // two frames.
    let mut read_frame = |input: &mut Vec<u8>, what: &str| -> anyhow::Result<Option<_>> {
        loop {
            if let Some(f) =
                decode_frame(input, PAYLOAD_MAX).context("a bad frame from the node")?
            {
                let frame = (f.kind, f.shard, f.start_lsn, f.payload.to_vec());
                let used = f.consumed;
                input.drain(..used);
                return Ok(Some(frame));
            }
            let want = frame_len(input).unwrap_or(FRAME_HEADER_BYTES);
            let have = input.len();
            input.resize(want.max(have + 1), 0);
            let n = reader.read(&mut input[have..])?;
            input.truncate(have + n);
            if n == 0 && have == 0 {
                return Ok(None);
            }
            ensure!(n > 0, "{} closed the connection {what}", args.from);
        }
    };
    while shards.len() < shard_count as usize {
        let what = format!("after {} of {shard_count} shards", shards.len());
        let Some((kind, shard, start, payload)) = read_frame(&mut input, &what)? else {
            bail!("{} closed the connection {what}", args.from);
        };
        let expected = shards.len() as u32;
        match kind {
            FrameKind::Refuse => bail!(
                "{} could not take the backup: {}",
                args.from,
                String::from_utf8_lossy(&payload)
            ),
            FrameKind::Snapshot => {
                ensure!(shard == expected, "shard {shard} sent, {expected} expected");
                if start == 0 {
                    let path = dir.join(shard_file(shard));
                    let f = std::fs::File::create(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    file = Some((shard, f, 0, 0));
                }
                let Some((_, f, written, crc)) = file.as_mut() else {
                    bail!("shard {shard}: a snapshot piece at {start} before its first");
                };
                ensure!(
                    start == *written,
                    "shard {shard}: a piece at {start}, expected {written}"
                );
                f.write_all(&payload)?;
                *written += payload.len() as u64;
                *crc = crc32c_append(*crc, &payload);
            }
            FrameKind::SnapshotEnd => {
                let end = decode_fixed::<SnapshotEnd>(kind, &payload)?;
                let Some((got, f, written, crc)) = file.take() else {
                    bail!("shard {shard}: a snapshot end without a snapshot");
                };
                ensure!(
                    got == shard,
                    "shard {shard}: the end of shard {got}'s snapshot"
                );
                ensure!(
                    written == end.file_bytes.get(),
                    "shard {shard}: {} bytes announced, {written} received",
                    end.file_bytes.get()
                );
                f.sync_all()?;
                let at = Expect {
                    lsn: end.lsn.get(),
                    chain: end.chain.get(),
                    epoch: end.epoch.get(),
                };
                verify_snapshot(&dir.join(shard_file(shard)), shard, at)?;
                shards.push(ShardBackup {
                    shard,
                    file: shard_file(shard),
                    bytes: written,
                    crc32c: crc,
                    lsn: at.lsn,
                    epoch: at.epoch,
                    chain: at.chain,
                    tail: None,
                });
            }
            other => bail!("an unexpected {other:?} frame in a backup"),
        }
    }
    // Then each shard's records up to the primary's consistent cut.
    let mut tail: Option<(std::fs::File, u64, u32)> = None;
    let mut next = 0u32;
    let mut consistent = true;
    // A node from before cuts ends the stream after the snapshots.
    let mut cuts = true;
    while next < shard_count {
        let what = format!("before shard {next} reached the consistent cut");
        let Some((kind, shard, start, payload)) = read_frame(&mut input, &what)? else {
            ensure!(
                next == 0 && tail.is_none(),
                "{} closed the connection {what}",
                args.from
            );
            (cuts, consistent) = (false, false);
            break;
        };
        match kind {
            FrameKind::Refuse => bail!(
                "{} could not take the backup: {}",
                args.from,
                String::from_utf8_lossy(&payload)
            ),
            FrameKind::Records | FrameKind::Cut => {
                ensure!(
                    shard == next,
                    "shard {shard}'s records sent, {next}'s expected"
                );
            }
            other => bail!("an unexpected {other:?} frame in a backup"),
        }
        let s = &mut shards[shard as usize];
        if tail.is_none() {
            let path = dir.join(tail_file(shard));
            let f = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            tail = Some((f, 0, 0));
        }
        let Some((f, written, crc)) = tail.as_mut() else {
            unreachable!("set above")
        };
        if kind == FrameKind::Records {
            let expected = s.lsn.checked_add(*written).context("an LSN past 2^64")?;
            ensure!(
                start == expected,
                "shard {shard}: records at lsn {start}, expected {expected}"
            );
            f.write_all(&payload)?;
            *written += payload.len() as u64;
            *crc = crc32c_append(*crc, &payload);
            continue;
        }
        let end = decode_fixed::<SnapshotEnd>(kind, &payload)?;
        consistent &= end.reserved.get() == 0;
        let Some((f, written, crc)) = tail.take() else {
            unreachable!("set above")
        };
        ensure!(
            written == end.file_bytes.get(),
            "shard {shard}: {} bytes of records announced, {written} received",
            end.file_bytes.get()
        );
        f.sync_all()?;
        drop(f);
        let from = Expect {
            lsn: s.lsn,
            chain: s.chain,
            epoch: s.epoch,
        };
        let reached = walk_records(&dir.join(tail_file(shard)), from, |_| Ok(()))?;
        ensure!(
            reached.lsn == end.lsn.get() && reached.chain == end.chain.get(),
            "shard {shard}: its records end at lsn {}, the cut is at {}",
            reached.lsn,
            end.lsn.get()
        );
        s.tail = Some(TailBackup {
            file: tail_file(shard),
            bytes: written,
            crc32c: crc,
            lsn: end.lsn.get(),
            epoch: end.epoch.get(),
            chain: end.chain.get(),
        });
        next += 1;
    }
    let manifest = Manifest {
        // 2 with records to a cut: a tidewal that reads only 1 (and would
        // leave them out without a word) refuses it.
        format: if cuts { 2 } else { 1 },
        source: args.from.clone(),
        cluster_id,
        taken_unix_ms,
        consistent,
        shards,
    };
    let path = dir.join(MANIFEST);
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)? + "\n")?;
    std::fs::File::open(&path)?.sync_all()?;
    staging.finish()?;
    let bytes: u64 = manifest.shards.iter().map(|s| s.bytes).sum();
    println!(
        "backup of {} ({} shards, {:.1} MB) written to {} in {:.2} s",
        args.from,
        manifest.shards.len(),
        bytes as f64 / 1e6,
        args.to.display(),
        started.elapsed().as_secs_f64()
    );
    if !cuts {
        println!(
            "warning: {} sends no records to a consistent cut (a tidewal from before them): each shard stands where its snapshot was taken, not at one moment",
            args.from
        );
    } else if !consistent {
        println!(
            "warning: {} could not ask its primary for a consistent cut (see its log): each shard stands where the node's log ended, not necessarily at one moment of the primary's",
            args.from
        );
    }
    for s in &manifest.shards {
        let cut = s.tail.as_ref().map_or(s.lsn, |t| t.lsn);
        println!(
            "  shard {}: {} at lsn {} (epoch {}), {} bytes, then records to the cut at lsn {cut}",
            s.shard, s.file, s.lsn, s.epoch, s.bytes
        );
    }
    Ok(())
}

fn shard_file(shard: u32) -> String {
    format!("shard-{shard:04}.snap")
}

fn tail_file(shard: u32) -> String {
    format!("shard-{shard:04}.tail")
}

/// Walks the records of a `.tail` file, which must continue the log at
/// `from` (chain and LSN checked record by record), calling `each` with
/// every record as encoded; returns the position after the last one.
fn walk_records(
    path: &Path,
    from: Expect,
    mut each: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Expect> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut file = BufReader::with_capacity(1 << 20, file);
    let mut at = from;
    let mut record = Vec::new();
    loop {
        record.clear();
        let n = (&mut file)
            .take(RECORD_HEADER_BYTES as u64)
            .read_to_end(&mut record)?;
        if n == 0 {
            return Ok(at);
        }
        loop {
            match decode_record(&record, at)
                .with_context(|| format!("{}: the record at lsn {}", path.display(), at.lsn))?
            {
                Decoded::Record(r) => {
                    ensure!(
                        r.encoded_len() == record.len(),
                        "{}: the record at lsn {} is {} bytes, {} read",
                        path.display(),
                        at.lsn,
                        r.encoded_len(),
                        record.len()
                    );
                    let next = r.next();
                    each(&record)?;
                    at = next;
                    break;
                }
                Decoded::Incomplete { needed } => {
                    let have = record.len();
                    ensure!(
                        needed > have,
                        "{}: a record at lsn {} it cannot read",
                        path.display(),
                        at.lsn
                    );
                    record.resize(needed, 0);
                    file.read_exact(&mut record[have..]).with_context(|| {
                        format!(
                            "{}: truncated in the record at lsn {}",
                            path.display(),
                            at.lsn
                        )
                    })?;
                }
            }
        }
    }
}

/// The snapshot verifies: its header (and the position it was sent with)
/// and every block's checksum and place, read back from the disk after it
/// was synced. (Restoring loads the entries too.)
fn verify_snapshot(path: &Path, shard: u32, at: Expect) -> anyhow::Result<()> {
    use tidewal::format::{SNAPSHOT_BLOCK_BYTES, SNAPSHOT_PAYLOAD_BYTES, decode_snapshot_block};
    use zerocopy::FromBytes;
    let mut file = std::fs::File::open(path)?;
    let mut head = vec![0u8; tidewal::io::BLOCK_BYTES as usize];
    file.read_exact(&mut head)
        .with_context(|| format!("{}: shorter than a header", path.display()))?;
    let (raw, _) = SnapshotHeader::read_from_prefix(&head)
        .map_err(|_| anyhow::anyhow!("{}: shorter than a header", path.display()))?;
    let log = LogId {
        cluster_id: raw.cluster_id,
        shard,
    };
    let h = SnapshotHeader::decode(&head, log).with_context(|| format!("{}", path.display()))?;
    ensure!(
        h.lsn.get() == at.lsn && h.chain.get() == at.chain && h.epoch.get() == at.epoch,
        "{}: the snapshot stands for lsn {}, not the lsn {} it was sent with",
        path.display(),
        h.lsn.get(),
        at.lsn
    );
    let blocks = h.stream_bytes.get().div_ceil(SNAPSHOT_PAYLOAD_BYTES as u64);
    let mut block = vec![0u8; SNAPSHOT_BLOCK_BYTES];
    let mut payload_bytes = 0u64;
    for index in 0..blocks {
        file.read_exact(&mut block)
            .with_context(|| format!("{}: truncated at block {index}", path.display()))?;
        let payload = decode_snapshot_block(&block, index)
            .with_context(|| format!("{}: block {index}", path.display()))?;
        payload_bytes += payload.len() as u64;
    }
    ensure!(
        payload_bytes == h.stream_bytes.get(),
        "{}: {payload_bytes} bytes in its blocks, its header says {}",
        path.display(),
        h.stream_bytes.get()
    );
    Ok(())
}

/// Replays a `.tail` file into `shard` (at `from`, its snapshot's
/// position), about 1 MiB of whole records at a time, each made durable.
fn replay(
    engine: &tidewal::engine::Engine,
    shard: u32,
    path: &Path,
    from: Expect,
) -> anyhow::Result<()> {
    let mut chunk: Vec<u8> = Vec::new();
    let flush = |chunk: &mut Vec<u8>| -> anyhow::Result<()> {
        if !chunk.is_empty() {
            let records = bytes::Bytes::from(std::mem::take(chunk));
            tidewal::engine::block_on(engine.replicate_at(
                shard,
                records,
                tidewal::engine::CommitLevel::Local,
            ))
            .with_context(|| format!("shard {shard}: replaying {}", path.display()))?;
        }
        Ok(())
    };
    walk_records(path, from, |record| {
        if chunk.len() + record.len() > 1 << 20 {
            flush(&mut chunk)?;
        }
        chunk.extend_from_slice(record);
        Ok(())
    })?;
    flush(&mut chunk)
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let path = args.from.join(MANIFEST);
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "{}: not a complete backup (tidewal backup writes it last)",
            path.display()
        )
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&text).with_context(|| format!("{}", path.display()))?;
    ensure!(
        manifest.format == 1 || manifest.format == 2,
        "{}: backup format {} (this tidewal reads 1 and 2)",
        path.display(),
        manifest.format
    );
    ensure!(
        manifest.format == 1 || manifest.shards.iter().all(|s| s.tail.is_some()),
        "{}: format 2 lists every shard's records to the cut",
        path.display()
    );
    let count = manifest.shards.len() as u32;
    ensure!(count > 0, "{}: no shards", path.display());
    for (i, s) in manifest.shards.iter().enumerate() {
        ensure!(
            s.shard == i as u32 && s.file == shard_file(s.shard),
            "{}: shard {i} is listed as {} / {}",
            path.display(),
            s.shard,
            s.file
        );
        if let Some(t) = &s.tail {
            ensure!(
                t.file == tail_file(s.shard),
                "{}: shard {i}'s records are listed as {}",
                path.display(),
                t.file
            );
        }
        // Damage at rest is found before anything is made.
        let listed = std::iter::once((&s.file, s.bytes, s.crc32c))
            .chain(s.tail.as_ref().map(|t| (&t.file, t.bytes, t.crc32c)));
        for (name, bytes, crc32c) in listed {
            let file = args.from.join(name);
            let (len, crc) = crc_of(&file)?;
            ensure!(
                len == bytes && crc == crc32c,
                "{}: damaged: {len} bytes with CRC32C {crc:08x}, the manifest says {bytes} bytes, {crc32c:08x}",
                file.display(),
            );
        }
    }
    if !manifest.consistent {
        println!(
            "warning: {} is not one moment of its source's data set (BACKUP.json: consistent is false): each shard is restored where its backup stood",
            args.from.display()
        );
    }
    let staging = Staging::new(&args.data_dir, "restoring", Some(RESTORING))?;
    let options = tidewal::engine::Options::new()
        .with_shard_count(count)
        .with_executor_count(1)
        .with_allow_buffered_io(args.allow_buffered_io);
    let engine = tidewal::engine::Engine::open(&staging.path, options)?;
    for s in &manifest.shards {
        let incoming = engine.shard_dir(s.shard).join("restore-incoming");
        std::fs::copy(args.from.join(&s.file), &incoming)
            .with_context(|| format!("copying {} into place", s.file))?;
        let want = Expect {
            lsn: s.lsn,
            chain: s.chain,
            epoch: s.epoch,
        };
        let at = tidewal::engine::block_on(engine.install_snapshot(s.shard, incoming, want))
            .with_context(|| format!("restoring shard {} from {}", s.shard, s.file))?;
        ensure!(
            at.lsn == s.lsn && at.chain == s.chain,
            "shard {}: restored to lsn {}, not {}",
            s.shard,
            at.lsn,
            s.lsn
        );
        if let Some(t) = &s.tail {
            replay(&engine, s.shard, &args.from.join(&t.file), at)?;
            let head = tidewal::engine::block_on(engine.stats())?
                .into_iter()
                .find(|x| x.shard == s.shard)
                .with_context(|| format!("shard {}: no figures", s.shard))?;
            ensure!(
                head.next_lsn == t.lsn && head.chain == t.chain,
                "shard {}: its log ends at lsn {} after the records, not at the cut {}",
                s.shard,
                head.next_lsn,
                t.lsn
            );
        }
    }
    tidewal::engine::block_on(engine.close())?;
    drop(engine);
    staging.finish()?;
    println!(
        "restored {count} shards from {} (taken from {}) into {}",
        args.from.display(),
        manifest.source,
        args.data_dir.display()
    );
    println!(
        "start it with `tidewal node --data-dir {}`: as a primary it founds a cluster of its own; with --replica-of a node of the source cluster it catches up from the backup's positions",
        args.data_dir.display()
    );
    Ok(())
}
