//! Asynchronous WAL streaming between real nodes on loopback: a replica
//! converges to its primary record for record (equal `(lsn, chain)` per
//! shard), serves reads, refuses writes, catches up after `kill -9`, and a
//! replica whose log diverged is refused and keeps its data.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::disk_dir;
use common::node::NodeProcess;
use redis::Commands;
use serde_json::Value;

fn status(node: &NodeProcess) -> Value {
    let (code, body) = node.get("/admin/replication/status");
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

/// `(head_lsn, chain)` of every shard.
fn positions(node: &NodeProcess) -> Vec<(u64, u64)> {
    status(node)["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["head_lsn"].as_u64().unwrap(),
                s["chain"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Waits until the replica holds exactly the primary's logs.
fn wait_converged(primary: &NodeProcess, replica: &NodeProcess) {
    let started = Instant::now();
    loop {
        let (p, r) = (positions(primary), positions(replica));
        if p == r {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "replica did not converge: primary {p:?}, replica {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The 4-shard replica `replica-1` of `upstream`, over `dir`.
fn start_replica(dir: &std::path::Path, upstream: &str) -> NodeProcess {
    NodeProcess::start(
        dir,
        &[
            "--shards",
            "4",
            "--replica-of",
            upstream,
            "--node-id",
            "replica-1",
        ],
    )
}

#[test]
fn a_replica_converges_serves_reads_and_catches_up_after_kill_9() {
    let (pdir, rdir) = (disk_dir(), disk_dir());
    let primary = NodeProcess::start(pdir.path(), &["--shards", "4"]);
    let upstream = primary.listen.to_string();
    let mut c = primary.client();
    for i in 0..300 {
        let _: () = c.set(format!("k{i}"), format!("v{i}")).unwrap();
    }
    let replica = start_replica(rdir.path(), &upstream);
    wait_converged(&primary, &replica);
    let mut r = replica.client();
    assert_eq!(r.get::<_, String>("k299").unwrap(), "v299");
    let err = r.set::<_, _, ()>("k0", "x").unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("read only replica"),
        "{err}"
    );
    assert!(
        err.to_string().contains(&upstream),
        "names the primary: {err}"
    );

    // Writes keep flowing to it.
    for i in 300..400 {
        let _: () = c.set(format!("k{i}"), format!("v{i}")).unwrap();
    }
    wait_converged(&primary, &replica);
    let s = status(&primary);
    let replicas = s["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1);
    assert_eq!(replicas[0]["node_id"], "replica-1");
    assert_eq!(replicas[0]["status"], "streaming");
    assert_eq!(replicas[0]["lag_bytes"], 0, "caught up");
    assert_eq!(
        replicas[0]["lag_seconds"], 0.0,
        "0 when caught up, also when idle"
    );
    let rs = status(&replica);
    assert_eq!(rs["role"], "replica");
    assert_eq!(rs["upstream"]["connected"], true);
    let info: String = redis::cmd("INFO").arg("replication").query(&mut r).unwrap();
    assert!(info.contains("role:slave"), "{info}");
    let role: (String, String, i64, String, i64) = redis::cmd("ROLE").query(&mut r).unwrap();
    assert_eq!((role.0.as_str(), role.3.as_str()), ("slave", "connected"));
    assert_eq!(role.2, primary.listen.port() as i64);
    let role: (String, i64, Vec<Vec<String>>) = redis::cmd("ROLE").query(&mut c).unwrap();
    assert_eq!(role.0, "master");
    assert_eq!(role.2.len(), 1, "one replica listed");

    // WAIT, as in Redis: the replica has this connection's writes.
    let _: () = c.set("waited", 1).unwrap();
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut c).unwrap();
    assert_eq!(acked, 1);

    // Killed, behind, restarted: it catches up from where its log ends.
    replica.kill9();
    let _: () = c.set("unreplicated", 1).unwrap();
    let started = Instant::now();
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(200).query(&mut c).unwrap();
    assert_eq!(acked, 0, "no replica has the last write");
    assert!(started.elapsed() >= Duration::from_millis(200));
    for i in 400..700 {
        let _: () = c.set(format!("k{i}"), format!("v{i}")).unwrap();
    }
    let s = status(&primary);
    assert_eq!(s["replicas"][0]["status"], "disconnected");
    let replica = start_replica(rdir.path(), &upstream);
    wait_converged(&primary, &replica);
    let mut r = replica.client();
    assert_eq!(r.get::<_, String>("k699").unwrap(), "v699");
    let size: i64 = redis::cmd("DBSIZE").query(&mut r).unwrap();
    assert_eq!(size, 702);
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut c).unwrap();
    assert_eq!(acked, 1, "the restarted replica has it now");
    assert_eq!(replica.terminate().code(), Some(0));
    assert_eq!(primary.terminate().code(), Some(0));
}

#[test]
fn a_diverged_replica_is_refused_and_keeps_its_data() {
    let (pdir, rdir) = (disk_dir(), disk_dir());
    let primary = NodeProcess::start(pdir.path(), &["--shards", "1"]);
    let upstream = primary.listen.to_string();
    let mut c = primary.client();
    for i in 0..20 {
        let _: () = c.set(format!("k{i}"), "primary").unwrap();
    }
    // A node that took writes of its own, then is pointed at the primary.
    let other = NodeProcess::start(rdir.path(), &["--shards", "1"]);
    let mut o = other.client();
    for i in 0..5 {
        let _: () = o.set(format!("mine{i}"), "other").unwrap();
    }
    assert_eq!(other.terminate().code(), Some(0));
    let replica = NodeProcess::start(rdir.path(), &["--shards", "1", "--replica-of", &upstream]);
    let started = Instant::now();
    loop {
        let s = status(&replica);
        let error = s["upstream"]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if error.contains("refused") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not refused: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing was truncated: its own writes are still there, read-only.
    let mut r = replica.client();
    assert_eq!(r.get::<_, String>("mine4").unwrap(), "other");
    let p = status(&primary);
    assert_eq!(p["replicas"][0]["status"], "diverged", "{p}");
}

#[test]
fn a_replica_with_another_shard_count_is_refused() {
    let (pdir, rdir) = (disk_dir(), disk_dir());
    let primary = NodeProcess::start(pdir.path(), &["--shards", "2"]);
    let upstream = primary.listen.to_string();
    let replica = NodeProcess::start(rdir.path(), &["--shards", "3", "--replica-of", &upstream]);
    let started = Instant::now();
    loop {
        let s = status(&replica);
        let error = s["upstream"]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if error.contains("refused") {
            assert!(error.contains("shard counts differ"), "{error}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not refused: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
