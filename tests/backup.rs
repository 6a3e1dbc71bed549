//! Backups taken from a replica (`tidewal backup`) and restored into new
//! data directories (`tidewal restore`), with the real binary: the restored
//! node holds every key the replica held, nothing later; a restored copy
//! started as a replica of the primary catches up from the backup's
//! position; the primary does no work for it; bad backups and bad targets
//! are refused with nothing made.

#[macro_use]
mod common;

use std::path::Path;

use common::disk_dir;
use common::node::{NodeProcess, positions, status, tidewal, wait_converged};
use redis::Commands;

/// `tidewal restore --from BACKUP --data-dir DIR`.
fn restore(backup: &Path, dir: &Path) -> (bool, String) {
    tidewal(&["restore", "--from", path(backup), "--data-dir", path(dir)])
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn snapshots_in(dir: &Path) -> usize {
    walk(dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "snap"))
        .count()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A primary over `pdir` started with `args`, and a replica of it over
/// `rdir` with the same.
fn primary_and_replica(pdir: &Path, rdir: &Path, args: &[&str]) -> (NodeProcess, NodeProcess) {
    let primary = NodeProcess::start(pdir, args);
    let upstream = primary.listen.to_string();
    let mut replica_args = args.to_vec();
    replica_args.extend(["--replica-of", upstream.as_str()]);
    let replica = NodeProcess::start(rdir, &replica_args);
    (primary, replica)
}

#[test]
fn a_backup_from_a_replica_restores_every_key_it_held_and_catches_up_as_a_replica() {
    let (pdir, rdir, work) = (disk_dir(), disk_dir(), disk_dir());
    let args = ["--shards", "2", "--commit-level", "replicated(1)"];
    let (primary, replica) = primary_and_replica(pdir.path(), rdir.path(), &args);
    let p_addr = primary.listen.to_string();
    let mut pc = primary.client();
    for i in 0..2000 {
        let _: () = pc.set(format!("k{i}"), format!("v{i}")).unwrap();
    }
    let _: () = pc.del("k7").unwrap();
    wait_converged(&primary, &replica);

    let backup = work.path().join("backup");
    let r_addr = replica.listen.to_string();
    let (ok, out) = tidewal(&["backup", "--from", &r_addr, "--to", path(&backup)]);
    assert!(ok, "{out}");
    assert!(out.contains("2 shards"), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup.join("BACKUP.json")).unwrap()).unwrap();
    let shards = manifest["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2, "{manifest}");
    // The backup stands for where the replica was: every shard at its head.
    let held = positions(&replica);
    for (s, (lsn, chain)) in shards.iter().zip(&held) {
        assert_eq!(s["lsn"].as_u64().unwrap(), *lsn, "{manifest}");
        assert_eq!(s["chain"].as_u64().unwrap(), *chain, "{manifest}");
    }
    // The primary did no work for it.
    assert_eq!(snapshots_in(pdir.path()), 0, "the primary took a snapshot");
    assert!(snapshots_in(rdir.path()) >= 2);

    // Written after the backup: not in it.
    let _: () = pc.set("after", "x").unwrap();

    // Restored and started on its own: exactly what the replica held.
    let restored = work.path().join("restored");
    let (ok, out) = restore(&backup, &restored);
    assert!(ok, "{out}");
    let node = NodeProcess::start(&restored, &[]);
    let mut c = node.client();
    let size: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(size, 1999);
    for i in [0, 1, 999, 1998, 1999] {
        let v: String = c.get(format!("k{i}")).unwrap();
        assert_eq!(v, format!("v{i}"));
    }
    assert_eq!(c.get::<_, Option<String>>("k7").unwrap(), None, "deleted");
    assert_eq!(c.get::<_, Option<String>>("after").unwrap(), None);
    assert_eq!(positions(&node), held);
    // A restored node is a primary of a cluster of its own: it takes
    // writes, and the source cluster's nodes would refuse it as upstream.
    let _: () = c.set("mine", 1).unwrap();
    assert_ne!(
        status(&node)["cluster_id"],
        status(&primary)["cluster_id"],
        "{}",
        status(&node)
    );
    drop(node);
    // A restore that did not finish leaves RESTORING: no node starts there.
    std::fs::write(restored.join("RESTORING"), "").unwrap();
    let refused = NodeProcess::try_start(&restored, &[])
        .err()
        .expect("refused");
    assert!(
        refused.contains("unfinished `tidewal restore`"),
        "{refused}"
    );

    // Restored again, into a directory made for it (filled in place, not
    // renamed over), and started as a replica of the primary: its log is
    // a prefix of the primary's, so it streams on from the backup's
    // position and converges.
    let again = work.path().join("again");
    std::fs::create_dir(&again).unwrap();
    let (ok, out) = restore(&backup, &again);
    assert!(ok, "{out}");
    let follower = NodeProcess::start(&again, &["--shards", "2", "--replica-of", &p_addr]);
    wait_converged(&primary, &follower);
    let s = status(&follower);
    assert_eq!(s["upstream"]["resyncs"], 0, "it needed no snapshot: {s}");
    let v: String = follower.client().get("after").unwrap();
    assert_eq!(v, "x");
}

/// The indices of the `seq{i}` keys a node holds, sorted.
fn seq_keys(node: &NodeProcess) -> Vec<u64> {
    let mut c = node.client();
    let mut found: Vec<u64> = c
        .scan_match::<_, String>("seq*")
        .unwrap()
        .map(|k| k.unwrap()[3..].parse().unwrap())
        .collect();
    found.sort_unstable();
    found
}

/// Whether `keys` are 0, 1, ..., n - 1.
fn is_prefix(keys: &[u64]) -> bool {
    keys.iter().enumerate().all(|(i, k)| *k == i as u64)
}

/// A backup is one moment of the whole data set, though its shards are
/// snapshotted one after another while writes go on: a client writes
/// `seq0`, `seq1`, ... each after the one before was acknowledged, spread
/// over four shards, and what is restored is exactly `seq0` to some `seqN`
/// (the primary's consistent cut), never a later key without an earlier.
#[test]
fn a_backup_taken_under_writes_restores_one_moment_of_every_shard() {
    let (pdir, rdir, work) = (disk_dir(), disk_dir(), disk_dir());
    let args = ["--shards", "4", "--commit-level", "local"];
    let (primary, replica) = primary_and_replica(pdir.path(), rdir.path(), &args);
    let p_addr = primary.listen.to_string();
    // Enough data that each shard's snapshot takes a while.
    let mut pc = primary.client();
    let value = "v".repeat(2000);
    for chunk in 0..20 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.set(format!("bulk{chunk}-{i}"), &value).ignore();
        }
        let _: () = pipe.query(&mut pc).unwrap();
    }
    wait_converged(&primary, &replica);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (stop, acked) = (stop.clone(), acked.clone());
        let mut c = primary.client();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _: () = c.set(format!("seq{i}"), i).unwrap();
                i += 1;
                acked.store(i, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    while acked.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let before = acked.load(std::sync::atomic::Ordering::Relaxed);
    let backup = work.path().join("backup");
    let r_addr = replica.listen.to_string();
    let (ok, out) = tidewal(&["backup", "--from", &r_addr, "--to", path(&backup)]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(ok, "{out}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup.join("BACKUP.json")).unwrap()).unwrap();
    let shards = manifest["shards"].as_array().unwrap();
    assert_eq!(manifest["consistent"], true, "{manifest}");
    let tail_bytes: u64 = shards
        .iter()
        .map(|s| s["tail"]["bytes"].as_u64().unwrap())
        .sum();
    assert!(tail_bytes > 0, "no shard moved on to the cut: {manifest}");

    // TIDEWAL.CUT: the primary's heads, also when a replica is asked (it
    // asks its upstream).
    wait_converged(&primary, &replica);
    let cut_of = |n: &NodeProcess| -> Vec<(u64, u64, u64)> {
        redis::cmd("TIDEWAL.CUT").query(&mut n.client()).unwrap()
    };
    let cut = cut_of(&primary);
    assert_eq!(cut_of(&replica), cut);
    let heads: Vec<(u64, u64)> = cut.iter().map(|c| (c.0, c.1)).collect();
    assert_eq!(heads, positions(&primary));

    let restored = work.path().join("restored");
    let (ok, out) = restore(&backup, &restored);
    assert!(ok, "{out}");
    let node = NodeProcess::start(&restored, &[]);
    let keys = seq_keys(&node);
    assert!(
        is_prefix(&keys),
        "not one moment: {} keys, the first missing one before {:?}",
        keys.len(),
        keys.last()
    );
    assert!(
        keys.len() as u64 >= before,
        "{} keys restored, {before} were acknowledged before the backup began",
        keys.len()
    );
    for (s, p) in shards.iter().zip(positions(&node)) {
        assert_eq!(s["tail"]["lsn"].as_u64().unwrap(), p.0, "{manifest}");
    }
    eprintln!(
        "consistent backup: {} of {} acknowledged keys, {tail_bytes} bytes of records to the cut",
        keys.len(),
        acked.load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(node);

    // Without the records to the cut (the snapshots alone, as before cuts
    // were taken), the shards stand at different moments: a later key
    // without an earlier one.
    let mut bare = manifest.clone();
    assert_eq!(bare["format"], 2, "records to a cut make format 2");
    bare["format"] = 1.into();
    for s in bare["shards"].as_array_mut().unwrap() {
        s.as_object_mut().unwrap().remove("tail");
    }
    std::fs::write(
        backup.join("BACKUP.json"),
        serde_json::to_vec_pretty(&bare).unwrap(),
    )
    .unwrap();
    let snapshots_only = work.path().join("snapshots-only");
    let (ok, out) = restore(&backup, &snapshots_only);
    assert!(ok, "{out}");
    let node = NodeProcess::start(&snapshots_only, &[]);
    assert!(
        !is_prefix(&seq_keys(&node)),
        "the snapshots alone were one moment too: the test shows nothing"
    );

    // With its primary gone, a replica still gives a backup (when one may
    // be wanted most), of what it holds, and says it is no cut of the
    // primary's.
    primary.kill9();
    // A replica passes TIDEWAL.CUT on to its upstream, here gone: it does
    // not answer with heads of its own.
    let err = redis::cmd("TIDEWAL.CUT")
        .query::<Vec<(u64, u64, u64)>>(&mut replica.client())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&p_addr), "{err}");
    let lone = work.path().join("lone");
    let (ok, out) = tidewal(&["backup", "--from", &r_addr, "--to", path(&lone)]);
    assert!(ok, "{out}");
    assert!(out.contains("could not ask its primary"), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lone.join("BACKUP.json")).unwrap()).unwrap();
    assert_eq!(manifest["consistent"], false, "{manifest}");
    let lone_restored = work.path().join("lone-restored");
    let (ok, out) = restore(&lone, &lone_restored);
    assert!(ok, "{out}");
    let node = NodeProcess::start(&lone_restored, &[]);
    assert_eq!(seq_keys(&node), seq_keys(&replica));
    assert_eq!(positions(&node), positions(&replica));
}

#[test]
fn bad_backups_and_bad_targets_are_refused_with_nothing_made() {
    let (ndir, work) = (disk_dir(), disk_dir());
    let node = NodeProcess::start(ndir.path(), &["--shards", "2"]);
    let mut c = node.client();
    for i in 0..100 {
        let _: () = c.set(format!("k{i}"), i).unwrap();
    }
    let addr = node.listen.to_string();

    // The command takes no argument.
    let err = redis::cmd("TIDEWAL.BACKUP")
        .arg("x")
        .query::<redis::Value>(&mut c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("wrong number of arguments"), "{err}");

    // Into a directory that holds something: refused, nothing overwritten.
    let full = work.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep"), "mine").unwrap();
    let (ok, out) = tidewal(&["backup", "--from", &addr, "--to", path(&full)]);
    assert!(!ok && out.contains("not empty"), "{out}");
    assert_eq!(std::fs::read_to_string(full.join("keep")).unwrap(), "mine");

    // From something that is not a tidewal node (the admin HTTP port).
    let (ok, out) = tidewal(&[
        "backup",
        "--from",
        &node.admin.to_string(),
        "--to",
        path(&work.path().join("http")),
    ]);
    assert!(!ok, "{out}");
    // Nothing is left behind: no target, no staging directory.
    let left: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(left, ["full"], "a failed backup leaves nothing");

    let backup = work.path().join("backup");
    let (ok, out) = tidewal(&["backup", "--from", &addr, "--to", path(&backup)]);
    assert!(ok, "{out}");

    // Restored into a directory that holds something: refused.
    let (ok, out) = restore(&backup, &full);
    assert!(!ok && out.contains("not empty"), "{out}");
    assert_eq!(std::fs::read_to_string(full.join("keep")).unwrap(), "mine");

    // A byte flipped at rest: restore refuses before it makes anything.
    let file = backup.join("shard-0001.snap");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    let target = work.path().join("restored");
    let (ok, out) = restore(&backup, &target);
    assert!(!ok && out.contains("damaged"), "{out}");
    assert!(!target.exists(), "nothing is made from a damaged backup");
    // Damage only the restore finds (a byte of the first block's entries,
    // the manifest's CRC made to match): into a directory made for it,
    // which is left empty.
    bytes[at] ^= 0x10;
    bytes[4096 + 16 + 3] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup.join("BACKUP.json")).unwrap()).unwrap();
    manifest["shards"][1]["crc32c"] = tidewal::format::crc32c(&bytes).into();
    std::fs::write(backup.join("BACKUP.json"), manifest.to_string()).unwrap();
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, out) = restore(&backup, &empty);
    assert!(!ok, "{out}");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "{out}");

    // A backup without its manifest is not one.
    std::fs::remove_file(backup.join("BACKUP.json")).unwrap();
    let (ok, out) = restore(&backup, &target);
    assert!(!ok && out.contains("not a complete backup"), "{out}");
    assert!(!target.exists());

    // And the node served all of it, and still serves.
    let v: i64 = c.get("k99").unwrap();
    assert_eq!(v, 99);
}
