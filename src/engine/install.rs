//! Installing an upstream's snapshot in place of a closed shard's log and
//! snapshots (a snapshot re-sync), so that a crash at any point leaves a
//! shard that opens: on its old log, or on the snapshot.
//!
//! 1. The received file is restamped with this node's log id and synced
//!    (it is not part of the shard yet).
//! 2. An `INSTALLING` file is written, synced and its name made durable:
//!    from then on the install is decided. It names the quarantine
//!    directory, the file to install and the name it takes.
//! 3. [`finish_install`] moves the shard's segments and snapshots (and a
//!    `RESYNC` marker, a torn-tail file) into the quarantine, renames the
//!    received file into place, writes the `RESYNC` marker (the log starts
//!    at the snapshot's position) and removes `INSTALLING`, syncing the
//!    directory after each step.
//!
//! Before a shard is opened, [`finish_install`] runs again: if a crash
//! interrupted step 3, it completes it (every step can be taken again).
//! Before step 2 is durable, the shard opens on its old log, untouched.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::rewind::sync_dir;
use crate::format::{LogId, parse_segment_file_name, parse_snapshot_file_name};

/// The install in progress in a shard directory, if any.
pub(super) const INSTALLING: &str = "INSTALLING";

/// What [`install`] needs.
pub(super) struct Install<'a> {
    /// The shard directory.
    pub dir: &'a Path,
    /// The received snapshot file, inside `dir`.
    pub file: &'a Path,
    /// The LSN it stands for (its file name in the shard).
    pub lsn: u64,
    /// This node's log id, written into the snapshot's header.
    pub log: LogId,
}

/// Installs the snapshot (steps 1 to 3). Returns the quarantine directory
/// and how many files went into it.
pub(super) fn install(what: Install<'_>) -> Result<(PathBuf, usize), String> {
    install_until(what, usize::MAX)
}

/// [`install`], stopping with an error after `steps` of step 3's durable
/// steps, as a crash would (the tests walk every crash point).
fn install_until(what: Install<'_>, steps: usize) -> Result<(PathBuf, usize), String> {
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let file_name = what
        .file
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|_| what.file.parent() == Some(what.dir))
        .ok_or_else(|| {
            format!(
                "{} is not a file of the shard directory",
                what.file.display()
            )
        })?;
    restamp_snapshot(what.file, what.log).map_err(|e| io("reading the snapshot", e))?;
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let intent = Intent {
        quarantine: format!("quarantine-{millis}"),
        file: file_name.to_string(),
        snapshot: crate::format::snapshot_file_name(what.lsn),
    };
    let tmp = what.dir.join(format!("{INSTALLING}.tmp"));
    std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(intent.encode().as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, what.dir.join(INSTALLING)))
        .and_then(|()| sync_dir(what.dir))
        .map_err(|e| io("writing INSTALLING", e))?;
    finish_install_until(what.dir, steps)?.ok_or_else(|| "INSTALLING vanished".to_string())
}

/// Completes an install a crash interrupted (see the module doc); nothing
/// to do without an `INSTALLING` file. Returns the quarantine directory and
/// how many files went into it this time.
pub(super) fn finish_install(dir: &Path) -> Result<Option<(PathBuf, usize)>, String> {
    finish_install_until(dir, usize::MAX)
}

fn finish_install_until(dir: &Path, steps: usize) -> Result<Option<(PathBuf, usize)>, String> {
    let mut step = super::rewind::crash_after(steps);
    let io = |what: &str, e: std::io::Error| format!("{}: {what}: {e}", dir.display());
    let text = match std::fs::read_to_string(dir.join(INSTALLING)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // An intent a crash cut short never decided anything.
            let _ = std::fs::remove_file(dir.join(format!("{INSTALLING}.tmp")));
            return Ok(None);
        }
        Err(e) => return Err(io("reading INSTALLING", e)),
    };
    let intent = Intent::decode(&text)
        .ok_or_else(|| format!("{}: INSTALLING is not one this node wrote", dir.display()))?;
    let quarantine = dir.join(&intent.quarantine);
    std::fs::create_dir_all(&quarantine).map_err(|e| io("creating the quarantine", e))?;
    sync_dir(dir).map_err(|e| io("syncing", e))?;
    step()?;
    let received = dir.join(&intent.file);
    // Until the received file is renamed into place, a file of its name in
    // the shard is the old log's; after, it is the installed one.
    let placed = !received.exists();
    let mut moved = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| io("listing", e))? {
        let name = entry
            .map_err(|e| io("listing", e))?
            .file_name()
            .to_string_lossy()
            .to_string();
        // Segments, snapshots (set aside as bad or cut short too), a torn
        // tail's copy, an earlier re-sync's marker.
        let ours = parse_segment_file_name(&name).is_some()
            || name.contains(".snap")
            || name.ends_with(".torn")
            || name == super::shard::RESYNC_MARKER;
        if !ours || (placed && name == intent.snapshot) {
            continue;
        }
        std::fs::rename(dir.join(&name), quarantine.join(&name))
            .map_err(|e| io("moving aside", e))?;
        sync_dir(dir).map_err(|e| io("syncing", e))?;
        step()?;
        moved += 1;
    }
    sync_dir(&quarantine).map_err(|e| io("syncing the quarantine", e))?;
    if !placed {
        std::fs::rename(&received, dir.join(&intent.snapshot))
            .map_err(|e| io("installing the snapshot", e))?;
        sync_dir(dir).map_err(|e| io("syncing", e))?;
        step()?;
    }
    std::fs::File::create(dir.join(super::shard::RESYNC_MARKER))
        .and_then(|f| f.sync_all())
        .and_then(|()| sync_dir(dir))
        .map_err(|e| io("writing the RESYNC marker", e))?;
    step()?;
    std::fs::remove_file(dir.join(INSTALLING))
        .and_then(|()| sync_dir(dir))
        .map_err(|e| io("removing INSTALLING", e))?;
    Ok(Some((quarantine, moved)))
}

/// A snapshot names the log it belongs to (cluster id, shard) in its
/// header. One sent by an upstream names the upstream's: after checking
/// that header, rewrite it for this node's log (the blocks carry their own
/// checksums and no log id).
fn restamp_snapshot(file: &Path, log: LogId) -> std::io::Result<()> {
    use crate::format::SnapshotHeader;
    use std::os::unix::fs::FileExt;
    use zerocopy::{FromBytes, IntoBytes};
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)?;
    let mut raw = vec![0u8; size_of::<SnapshotHeader>()];
    f.read_exact_at(&mut raw, 0)?;
    let (theirs, _) = SnapshotHeader::read_from_prefix(&raw)
        .map_err(|_| bad("snapshot shorter than its header".into()))?;
    let their_log = LogId {
        cluster_id: theirs.cluster_id,
        shard: theirs.shard.get(),
    };
    let h = SnapshotHeader::decode(&raw, their_log).map_err(|e| bad(e.to_string()))?;
    let ours = SnapshotHeader::new(
        log,
        h.lsn.get(),
        h.epoch.get(),
        h.chain.get(),
        h.entries.get(),
        h.stream_bytes.get(),
    );
    f.write_all_at(ours.as_bytes(), 0)?;
    f.sync_all()
}

/// What `INSTALLING` holds: three lines, each a file name in the shard
/// directory.
struct Intent {
    quarantine: String,
    file: String,
    snapshot: String,
}

impl Intent {
    fn encode(&self) -> String {
        format!("{}\n{}\n{}\n", self.quarantine, self.file, self.snapshot)
    }

    fn decode(text: &str) -> Option<Intent> {
        let mut lines = text.lines();
        let plain = |n: &str| !n.is_empty() && !n.contains('/') && n != "." && n != "..";
        let quarantine = lines
            .next()
            .filter(|n| plain(n) && n.starts_with("quarantine-"))?;
        let file = lines.next().filter(|n| plain(n))?;
        let snapshot = lines
            .next()
            .filter(|n| plain(n) && parse_snapshot_file_name(n).is_some())?;
        lines.next().is_none().then(|| Intent {
            quarantine: quarantine.to_string(),
            file: file.to_string(),
            snapshot: snapshot.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rewind::tests::{copy_dir, disk_root, log_of, one_shard as options};
    use crate::engine::{Engine, block_on};

    fn wal_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".wal"))
            .count()
    }

    /// A crash between any two steps of an install leaves a shard that
    /// opens: before `INSTALLING` is durable on its old log, untouched;
    /// after, on the installed snapshot (the open completes the install),
    /// with every old segment in the quarantine.
    #[test]
    fn a_crash_at_any_step_of_an_install_leaves_a_shard_that_opens() {
        let root = disk_root();
        // The upstream: its snapshot is what gets installed.
        let upstream = root.path().join("upstream");
        let engine = Engine::open(&upstream, options()).unwrap();
        for i in 0..300 {
            block_on(engine.put(format!("u{i:04}"), "upstream")).unwrap();
        }
        let lsn = block_on(engine.snapshot()).unwrap()[0];
        let theirs = block_on(engine.stats()).unwrap()[0].clone();
        assert_eq!(theirs.next_lsn, lsn);
        block_on(engine.close()).unwrap();
        let snapshot = upstream
            .join("shard-0000")
            .join(crate::format::snapshot_file_name(lsn));
        // This node: a log of several segments and a snapshot of its own.
        let pristine = root.path().join("pristine");
        let engine = Engine::open(&pristine, options()).unwrap();
        let value = "v".repeat(200);
        for i in 0..3000 {
            block_on(engine.put(format!("a{i:04}"), value.clone())).unwrap();
            if i == 1500 {
                block_on(engine.snapshot()).unwrap();
            }
        }
        let ours = block_on(engine.stats()).unwrap()[0].clone();
        block_on(engine.close()).unwrap();
        let segments = wal_files(&pristine.join("shard-0000"));
        assert!(segments >= 3, "{segments} segments");

        // Received, but a crash came before INSTALLING was in place.
        let dir = root.path().join("before");
        copy_dir(&pristine, &dir);
        let shard = dir.join("shard-0000");
        std::fs::copy(&snapshot, shard.join("resync-incoming")).unwrap();
        std::fs::write(shard.join(format!("{INSTALLING}.tmp")), "partial").unwrap();
        let engine = Engine::open(&dir, options()).unwrap();
        let s = block_on(engine.stats()).unwrap()[0].clone();
        assert_eq!(
            (s.next_lsn, s.chain, s.keys),
            (ours.next_lsn, ours.chain, 3000)
        );
        block_on(engine.close()).unwrap();
        assert!(!shard.join(format!("{INSTALLING}.tmp")).exists());

        let mut steps = 0;
        loop {
            let dir = root.path().join(format!("crash-{steps}"));
            copy_dir(&pristine, &dir);
            let shard = dir.join("shard-0000");
            let file = shard.join("resync-incoming");
            std::fs::copy(&snapshot, &file).unwrap();
            let what = Install {
                dir: &shard,
                file: &file,
                lsn,
                log: log_of(&shard),
            };
            let finished = install_until(what, steps).is_ok();
            let engine = Engine::open(&dir, options())
                .unwrap_or_else(|e| panic!("after {steps} steps the shard does not open: {e}"));
            let s = block_on(engine.stats()).unwrap()[0].clone();
            assert_eq!(
                (s.next_lsn, s.chain, s.keys),
                (theirs.next_lsn, theirs.chain, 300),
                "after {steps} steps"
            );
            assert_eq!(
                block_on(engine.get("u0007")).unwrap().as_deref(),
                Some(&b"upstream"[..])
            );
            assert!(block_on(engine.get("a0007")).unwrap().is_none());
            block_on(engine.close()).unwrap();
            assert!(!shard.join(INSTALLING).exists());
            let quarantine = std::fs::read_dir(&shard)
                .unwrap()
                .flatten()
                .find(|e| e.file_name().to_string_lossy().starts_with("quarantine-"))
                .unwrap()
                .path();
            assert_eq!(wal_files(&quarantine), segments, "after {steps} steps");
            std::fs::remove_dir_all(&dir).unwrap();
            if finished {
                break;
            }
            steps += 1;
        }
        assert!(steps >= 5, "only {steps} crash points walked");
    }

    #[test]
    fn an_installing_file_not_written_here_is_an_error() {
        for text in [
            "",
            "quarantine-1\nresync-incoming\n",
            "quarantine-1\n../x\n00000000000000000010.snap\n",
            "elsewhere\nresync-incoming\n00000000000000000010.snap\n",
            "quarantine-1\nresync-incoming\nnot-a-snapshot\n",
            "quarantine-1\nresync-incoming\n00000000000000000010.snap\nmore\n",
        ] {
            assert!(Intent::decode(text).is_none(), "{text:?}");
        }
        let intent = Intent {
            quarantine: "quarantine-1".into(),
            file: "resync-incoming".into(),
            snapshot: crate::format::snapshot_file_name(16),
        };
        let back = Intent::decode(&intent.encode()).unwrap();
        assert_eq!(
            (back.quarantine, back.file, back.snapshot),
            (intent.quarantine, intent.file, intent.snapshot)
        );
    }
}
