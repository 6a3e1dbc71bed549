//! Rewinding a closed shard's log to an earlier record boundary, with the
//! records after it kept aside: what a replica does when its log parts from
//! its upstream's at a known LSN (an old primary that kept writing after a
//! failover, a replica that took writes of its own in a later epoch).
//!
//! Cheaper than a snapshot re-sync (the common prefix stays, only the
//! divergent suffix is streamed again) and never a silent truncate:
//!
//! 1. [`plan_rewind`] checks, before anything is touched, that the LSN is
//!    where a record ends and that a base to rebuild the state from remains
//!    (a snapshot at or below it that the log still covers, verified by the
//!    caller, or a log from 0).
//! 2. [`apply_rewind`] copies the segment holding the cut into
//!    `quarantine-<unix ms>/` and writes, beside the live one, that segment
//!    cut back (its bytes up to the cut, then zeros); then moves into the
//!    quarantine the snapshots past the cut, then the later segments,
//!    newest first; then renames the cut-back segment over the live one.
//!    The directory is synced after every step.
//!
//! Both use plain file calls; the engine runs them on glommio's blocking
//! thread, so the executor's other shards keep serving.
//!
//! Whatever step a crash interrupts, what the shard directory holds is a
//! prefix of the old log at least as long as the cut, with the base and no
//! snapshot past its end: it opens, and serves the old (divergent) state
//! until a re-sync is asked for again, which rewinds again.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::format::{LogId, parse_segment_file_name, parse_snapshot_file_name, segment_file_name};
use crate::wal::{offset_of, scan_segment};

/// What a rewind moved aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewound {
    /// The quarantine directory (inside the shard's directory).
    pub quarantine: PathBuf,
    /// Where the log ended before.
    pub old_end: u64,
    /// Files moved or copied into the quarantine.
    pub files: Vec<String>,
}

/// The files of a shard directory that a rewind looks at.
struct Listing {
    /// `(base lsn, name)`, by base.
    segments: Vec<(u64, String)>,
    /// `(lsn, name)`, by lsn.
    snapshots: Vec<(u64, String)>,
}

fn list(dir: &Path) -> std::io::Result<Listing> {
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if let Some(base) = parse_segment_file_name(&name) {
            segments.push((base, name));
        } else if let Some(lsn) = parse_snapshot_file_name(&name) {
            snapshots.push((lsn, name));
        }
    }
    segments.sort();
    snapshots.sort();
    Ok(Listing {
        segments,
        snapshots,
    })
}

/// A rewind checked and ready to apply.
#[derive(Debug)]
pub(super) struct RewindPlan {
    dir: PathBuf,
    lsn: u64,
    old_end: u64,
    cut_base: u64,
    cut_name: String,
    /// The cut segment's bytes and the cut's offset in them, unless the cut
    /// is at the start of a segment (the whole segment is suffix).
    cut_bytes: Option<(Vec<u8>, usize)>,
    /// Segments past the cut, oldest first.
    later: Vec<String>,
    /// Snapshots past the cut.
    snapshots_after: Vec<String>,
    /// The snapshot the state is rebuilt from (`None`: a log from 0).
    pub base_snapshot: Option<String>,
}

/// Checks a rewind of the log in `dir` (a closed shard's directory) to
/// `lsn`; changes nothing. The error says why it cannot be done.
pub(super) fn plan_rewind(dir: &Path, log: LogId, lsn: u64) -> Result<RewindPlan, String> {
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let files = list(dir).map_err(|e| io("listing the shard directory", e))?;
    let Some(first_base) = files.segments.first().map(|(b, _)| *b) else {
        return Err("the shard has no log to rewind".into());
    };
    let Some(at) = files.segments.iter().rposition(|(b, _)| *b <= lsn) else {
        return Err(format!(
            "lsn {lsn} is below the log's first segment ({first_base}): a snapshot re-sync is needed"
        ));
    };
    // Something to rebuild the state from once the suffix is gone.
    let base_snapshot = files
        .snapshots
        .iter()
        .rev()
        .find(|(s, _)| *s <= lsn && *s >= first_base);
    if base_snapshot.is_none() && first_base > 0 {
        return Err(format!(
            "no snapshot at or below lsn {lsn} that the log still covers (it starts at {first_base}): a snapshot re-sync is needed"
        ));
    }
    // Where the cut falls: inside segment `at`, or exactly at its start (the
    // whole segment is suffix; the previous one ends at its base).
    let (cut_base, cut_name) = files.segments[at].clone();
    let cut_path = dir.join(&cut_name);
    let whole = lsn == cut_base && at > 0;
    let mut cut_bytes = None;
    let old_end;
    if whole {
        old_end = log_end_of(dir, log, &files.segments[files.segments.len() - 1])?;
    } else {
        let bytes = std::fs::read(&cut_path).map_err(|e| io(&cut_name, e))?;
        let mut boundary = lsn == cut_base;
        let scan = scan_segment(&bytes, log, cut_base, 0, |r| {
            boundary |= r.next().lsn == lsn;
        });
        if scan.header.is_none() {
            return Err(format!("{cut_name}: its header does not validate"));
        }
        if !boundary {
            return Err(format!(
                "lsn {lsn} is not where a record of {cut_name} ends (its records end at {})",
                scan.end.lsn
            ));
        }
        old_end = if at + 1 < files.segments.len() {
            log_end_of(dir, log, &files.segments[files.segments.len() - 1])?
        } else {
            scan.end.lsn
        };
        cut_bytes = Some((bytes, offset_of(cut_base, lsn) as usize));
    }
    let later: Vec<String> = files.segments[at + usize::from(!whole)..]
        .iter()
        .map(|(_, n)| n.clone())
        .collect();
    if later.is_empty() && old_end == lsn {
        return Err(format!("the log already ends at lsn {lsn}"));
    }
    Ok(RewindPlan {
        dir: dir.to_path_buf(),
        lsn,
        old_end,
        cut_base,
        cut_name,
        cut_bytes,
        later,
        snapshots_after: files
            .snapshots
            .iter()
            .filter(|(s, _)| *s > lsn)
            .map(|(_, n)| n.clone())
            .collect(),
        base_snapshot: base_snapshot.map(|(_, n)| n.clone()),
    })
}

/// Applies a checked rewind, in the order the module doc gives.
pub(super) fn apply_rewind(plan: RewindPlan) -> Result<Rewound, String> {
    apply_rewind_until(plan, usize::MAX)
}

/// Called after each durable step of a file operation that a test may stop
/// there, as a crash would: an error from the `steps + 1`-th call on.
pub(super) fn crash_after(steps: usize) -> impl FnMut() -> Result<(), String> {
    let mut done = 0;
    move || {
        done += 1;
        if done > steps {
            Err(format!("stopped after {steps} steps"))
        } else {
            Ok(())
        }
    }
}

/// What a crash after `steps` of [`apply_rewind`]'s durable steps leaves:
/// it stops there with an error (the tests walk every crash point).
fn apply_rewind_until(plan: RewindPlan, steps: usize) -> Result<Rewound, String> {
    let mut step = crash_after(steps);
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let (dir, lsn, old_end) = (plan.dir.as_path(), plan.lsn, plan.old_end);
    let (cut_base, cut_name) = (plan.cut_base, &plan.cut_name);
    let cut_path = dir.join(cut_name);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let quarantine = dir.join(format!("quarantine-{millis}"));
    std::fs::create_dir_all(&quarantine).map_err(|e| io("creating the quarantine", e))?;
    let mut kept = Vec::new();
    let held = if plan.cut_bytes.is_some() {
        format!(
            "They are in the segment files here, the log's own files as they were (`tidewal wal \
             inspect` reads them; the records before lsn {lsn} in {} are also still in the live log)",
            segment_file_name(cut_base)
        )
    } else {
        "They are in the segment files here, the log's own files as they were (`tidewal wal \
         inspect` reads them)"
            .to_string()
    };
    let note = format!(
        "A rewind of this shard's log to lsn {lsn} (it ended at {old_end}): the records from lsn \
         {lsn} on were not on the upstream's history. {held}, beside the snapshots taken past \
         the cut.\n"
    );
    std::fs::File::create(quarantine.join("REWIND.txt"))
        .and_then(|mut f| {
            f.write_all(note.as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| io("writing REWIND.txt", e))?;
    step()?;
    let tmp = dir.join(format!("{cut_name}.rewind"));
    if let Some((mut bytes, cut)) = plan.cut_bytes {
        let copy = quarantine.join(cut_name);
        std::fs::write(&copy, &bytes)
            .and_then(|_| std::fs::File::open(&copy)?.sync_all())
            .map_err(|e| io("copying the segment holding the cut", e))?;
        step()?;
        kept.push(cut_name.clone());
        bytes[cut..].fill(0);
        std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(&bytes)?;
                f.sync_all()
            })
            .map_err(|e| io("writing the rewound segment", e))?;
        step()?;
    }
    sync_dir(&quarantine).map_err(|e| io("syncing the quarantine", e))?;
    step()?;
    // Snapshots past the cut first (the log still holds them), then the
    // later segments newest first: each step leaves a prefix of the log.
    for name in plan.snapshots_after.iter().chain(plan.later.iter().rev()) {
        std::fs::rename(dir.join(name), quarantine.join(name))
            .map_err(|e| io("moving aside", e))?;
        sync_dir(dir).map_err(|e| io("syncing the shard directory", e))?;
        step()?;
        kept.push(name.clone());
    }
    if tmp.exists() {
        std::fs::rename(&tmp, &cut_path).map_err(|e| io("replacing the segment", e))?;
        sync_dir(dir).map_err(|e| io("syncing the shard directory", e))?;
        step()?;
    }
    sync_dir(&quarantine).map_err(|e| io("syncing the quarantine", e))?;
    Ok(Rewound {
        quarantine,
        old_end,
        files: kept,
    })
}

/// Where the records of the log's last segment end.
fn log_end_of(dir: &Path, log: LogId, last: &(u64, String)) -> Result<u64, String> {
    let bytes = std::fs::read(dir.join(&last.1)).map_err(|e| format!("{}: {e}", last.1))?;
    Ok(scan_segment(&bytes, log, last.0, 0, |_| {}).end.lsn)
}

/// Makes the names in `dir` durable (a rename, a new or removed file).
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::engine::{Engine, Options, block_on};
    use crate::format::SegmentHeader;
    use zerocopy::FromBytes;

    pub(crate) fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap().flatten() {
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    pub(crate) fn log_of(shard_dir: &Path) -> LogId {
        let first = list(shard_dir).unwrap().segments[0].1.clone();
        let bytes = std::fs::read(shard_dir.join(first)).unwrap();
        let (header, _) = SegmentHeader::read_from_prefix(&bytes).unwrap();
        LogId {
            cluster_id: header.cluster_id,
            shard: header.shard.get(),
        }
    }

    /// A scratch directory on the disk (O_DIRECT), not a tmpfs.
    pub(crate) fn disk_root() -> tempfile::TempDir {
        let under = concat!(env!("CARGO_MANIFEST_DIR"), "/target");
        std::fs::create_dir_all(under).unwrap();
        tempfile::tempdir_in(under).unwrap()
    }

    /// One shard on one executor, small segments.
    pub(crate) fn one_shard() -> Options {
        let mut o = Options::new();
        o.shard_count = 1;
        o.executor_count = 1;
        o.segment_bytes = 256 << 10;
        o
    }

    /// A crash between any two steps of a rewind leaves a shard that opens
    /// on a prefix of the old log at least as long as the cut, with a state
    /// that matches its end; the rewind asked again then completes.
    #[test]
    fn a_crash_at_any_step_of_a_rewind_leaves_a_log_that_opens_and_rewinds_again() {
        let root = disk_root();
        let pristine = root.path().join("pristine");
        let options = one_shard;
        let engine = Engine::open(&pristine, options()).unwrap();
        let value = "v".repeat(200);
        for i in 0..600 {
            block_on(engine.put(format!("a{i:04}"), value.clone())).unwrap();
        }
        block_on(engine.snapshot()).unwrap();
        for i in 0..300 {
            block_on(engine.put(format!("b{i:04}"), value.clone())).unwrap();
        }
        let cut = block_on(engine.stats()).unwrap()[0].clone();
        for i in 0..2000 {
            block_on(engine.put(format!("a{:04}", i % 600), "c".repeat(200))).unwrap();
            if i == 1000 {
                block_on(engine.snapshot()).unwrap();
            }
        }
        let end = block_on(engine.stats()).unwrap()[0].clone();
        block_on(engine.close()).unwrap();
        let shard = |dir: &Path| dir.join("shard-0000");
        let log = log_of(&shard(&pristine));
        assert!(list(&shard(&pristine)).unwrap().segments.len() >= 3);

        let mut steps = 0;
        loop {
            let dir = root.path().join(format!("crash-{steps}"));
            copy_dir(&pristine, &dir);
            let plan = plan_rewind(&shard(&dir), log, cut.next_lsn).unwrap();
            let finished = apply_rewind_until(plan, steps).is_ok();
            let engine = Engine::open(&dir, options())
                .unwrap_or_else(|e| panic!("after {steps} steps the shard does not open: {e}"));
            let now = block_on(engine.stats()).unwrap()[0].clone();
            assert!(
                (cut.next_lsn..=end.next_lsn).contains(&now.next_lsn),
                "after {steps} steps the log ends at {}, outside {}..={}",
                now.next_lsn,
                cut.next_lsn,
                end.next_lsn
            );
            // The state is the one of the log it opened on.
            let a0 = block_on(engine.get("a0000")).unwrap().unwrap();
            if now.next_lsn == cut.next_lsn {
                assert_eq!(a0, value.as_bytes(), "after {steps} steps");
            }
            if now.next_lsn == end.next_lsn {
                assert_eq!(a0, "c".repeat(200).as_bytes(), "after {steps} steps");
            }
            // Asked again (unless the cut is already in place), the rewind
            // completes.
            if now.next_lsn != cut.next_lsn {
                let pos = block_on(engine.rewind(0, cut.next_lsn))
                    .unwrap_or_else(|e| panic!("after {steps} steps the rewind fails again: {e}"));
                assert_eq!((pos.lsn, pos.chain), (cut.next_lsn, cut.chain));
            }
            let s = block_on(engine.stats()).unwrap()[0].clone();
            assert_eq!((s.next_lsn, s.chain), (cut.next_lsn, cut.chain));
            assert_eq!(s.keys, 900, "after {steps} steps");
            assert_eq!(
                block_on(engine.get("a0000")).unwrap().as_deref(),
                Some(value.as_bytes())
            );
            block_on(engine.close()).unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            if finished {
                break;
            }
            steps += 1;
        }
        assert!(steps >= 6, "only {steps} crash points walked");
    }
}
