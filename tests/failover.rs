//! Automatic failover between real nodes on loopback: the primary is
//! killed under `replicated(1)` load, the replica that lags (its link goes
//! through a delaying proxy) is the only candidate and is elected: it must
//! gather from the other replica the writes only that one acknowledged.
//! The other follows it, no acknowledged write is lost, and the old
//! primary, back with writes of its own, steps down, rewinds them away and
//! follows the new one.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::node::{NodeProcess, status, wait_converged};
use common::proxy::Proxy;
use common::{disk_dir, quarantined};
use redis::Commands;

/// Waits (up to 30 s) until `check` holds, and returns what it returned.
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(t) = check() {
            return t;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A 2-shard node whose failover timeout is 1 s, on `extra`'s terms.
fn start(dir: &std::path::Path, extra: &[&str]) -> NodeProcess {
    let mut args = vec![
        "--shards",
        "2",
        "--election-timeout-ms",
        "1000",
        "--commit-level",
        "replicated(1)",
        "--sentinel",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    NodeProcess::start(dir, &args)
}

/// A primary "p", and "a" following it, which votes but never stands.
fn primary_and_voter(pdir: &std::path::Path, adir: &std::path::Path) -> (NodeProcess, NodeProcess) {
    let primary = start(pdir, &["--node-id", "p"]);
    let p_addr = primary.listen.to_string();
    let a = start(
        adir,
        &[
            "--replica-of",
            &p_addr,
            "--node-id",
            "a",
            "--no-failover-candidate",
        ],
    );
    (primary, a)
}

/// Makes `nodes` each other's failover peers (`TIDEWAL.PEERS`).
fn make_peers(nodes: &[&NodeProcess]) {
    for node in nodes {
        let mut cmd = redis::cmd("TIDEWAL.PEERS");
        for n in nodes {
            cmd.arg(n.listen.to_string());
        }
        let peers: Vec<String> = cmd.query(&mut node.client()).unwrap();
        assert_eq!(
            peers.len(),
            nodes.len() - 1,
            "a node is not its own peer: {peers:?}"
        );
    }
}

/// A connection to `node`'s Sentinel port.
fn sentinel_port(node: &NodeProcess) -> redis::Connection {
    let url = format!("redis://{}/", node.sentinel.expect("--sentinel"));
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

/// `SENTINEL get-master-addr-by-name tidewal` on `node`, as `HOST:PORT`.
fn master_addr(node: &NodeProcess) -> String {
    let (ip, port): (String, String) = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg("tidewal")
        .query(&mut sentinel_port(node))
        .unwrap();
    format!("{ip}:{port}")
}

fn vote(node: &NodeProcess, epoch: u64, candidate: &str, log_epoch: u64) -> (i64, String) {
    let mut c = node.client();
    let answer: Vec<redis::Value> = redis::cmd("TIDEWAL.VOTE")
        .arg(epoch)
        .arg(candidate)
        .arg(log_epoch)
        .query(&mut c)
        .unwrap();
    let granted = match &answer[0] {
        redis::Value::Int(n) => *n,
        other => panic!("{other:?}"),
    };
    let why = match &answer[1] {
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Okay => "OK".into(),
        other => panic!("{other:?}"),
    };
    (granted, why)
}

#[test]
fn the_primary_killed_under_load_is_replaced_and_no_acknowledged_write_is_lost() {
    let (pdir, adir, bdir) = (disk_dir(), disk_dir(), disk_dir());
    // a keeps up, and never stands; b, behind a slow link, is the only
    // candidate.
    let (primary, a) = primary_and_voter(pdir.path(), adir.path());
    let p_addr = primary.listen.to_string();
    let proxy = Proxy::start(primary.listen);
    let b = start(
        bdir.path(),
        &["--replica-of", &proxy.addr.to_string(), "--node-id", "b"],
    );
    let (a_addr, b_addr) = (a.listen.to_string(), b.listen.to_string());
    make_peers(&[&primary, &a, &b]);
    let epoch = status(&primary)["epoch"].as_u64().unwrap();
    let mut c = primary.client();
    for i in 0..200 {
        let _: () = c.set(format!("k{i}"), i).unwrap();
    }
    wait_converged(&primary, &a);
    wait_converged(&primary, &b);

    // While the primary is heard, no vote deposes it.
    let (granted, why) = vote(&a, epoch + 5, &b_addr, epoch);
    assert_eq!(granted, 0);
    assert!(why.contains("hears its upstream"), "{why}");
    let (granted, why) = vote(&primary, epoch + 5, &a_addr, epoch);
    assert_eq!(granted, 0);
    assert!(why.contains("primary"), "{why}");
    // Bad election commands get an error, and change nothing.
    let mut ac = a.client();
    for (args, says) in [
        (vec!["TIDEWAL.VOTE", "x", "c", "1"], "numbers"),
        (vec!["TIDEWAL.VOTE", "9", "c", "1", "MAYBE"], "HOST:PORT"),
        (vec!["TIDEWAL.VOTE", "9", "10.0.0.1:1", "1", "MAYBE"], "PRE"),
        (vec!["TIDEWAL.VOTE", "9", "a b:1", "1"], "HOST:PORT"),
        (vec!["TIDEWAL.FETCH", "9", "0", "0", "0"], "no shard 9"),
        (vec!["TIDEWAL.FETCH", "0", "7", "0", "0"], "TIDEWAL.FETCH"),
        (vec!["TIDEWAL.FETCH", "0"], "wrong number of arguments"),
    ] {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let err = cmd.query::<redis::Value>(&mut ac).unwrap_err().to_string();
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(status(&a)["failover"]["vote_epoch"], 0, "nothing was taken");
    assert!(status(&a)["failover"]["stopped_seconds"].is_null());

    // Writes at replicated(1) from four clients, until the primary dies;
    // b receives them 50 ms late, so the last ones are acknowledged by a
    // only.
    proxy.delay(50);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (acked, mut c) = (acked.clone(), primary.client());
            std::thread::spawn(move || {
                for i in 0.. {
                    let key = format!("w{w}-{i}");
                    if c.set::<_, _, ()>(&key, i).is_err() {
                        return;
                    }
                    acked.lock().unwrap().push(key);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut primary = primary;
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    let killed = Instant::now();
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "the load ran: {} writes", acked.len());

    // b is elected and promoted; a follows it.
    let (winner, other) = (&b, &a);
    wait_for("b is elected", || {
        (status(&b)["role"] == "primary").then_some(())
    });
    assert_eq!(status(&a)["failover"]["elections"], 0, "a never stands");
    let elected_after = killed.elapsed();
    let ws = status(winner);
    let new_epoch = ws["epoch"].as_u64().unwrap();
    assert!(new_epoch > epoch, "{ws}");
    assert_eq!(ws["failover"]["won"], 1, "{ws}");
    let winner_addr = winner.listen.to_string();
    wait_for("the other replica follows the new primary", || {
        let s = status(other);
        (s["upstream"]["host"] == winner_addr.as_str() && s["upstream"]["connected"] == true)
            .then_some(())
    });

    // Every write the old primary acknowledged is on the new one.
    let mut wc = winner.client();
    for key in &acked {
        let value: Option<i64> = wc.get(key).unwrap();
        assert!(
            value.is_some(),
            "acknowledged {key} was lost in the failover"
        );
    }
    // And it takes writes at replicated(1): the other replica acks them.
    for i in 0..50 {
        let _: () = wc.set(format!("after{i}"), i).unwrap();
    }
    wait_converged(winner, other);
    assert_eq!(other.client().get::<_, i64>("after49").unwrap(), 49);
    // One vote per epoch: the other replica gave its vote in the epoch the
    // winner was elected in (or stood in it).
    let (granted, why) = vote(other, new_epoch, "127.0.0.1:1", new_epoch);
    assert_eq!(granted, 0, "{why}");

    // The old primary comes back alone first (a split brain: no peers) and
    // takes a write the new primary never sees ...
    let old = NodeProcess::start(
        pdir.path(),
        &[
            "--shards",
            "2",
            "--listen",
            &p_addr,
            "--commit-level",
            "local",
            "--node-id",
            "p",
        ],
    );
    let _: () = old.client().set("split-brain", 1).unwrap();
    assert_eq!(old.terminate().code(), Some(0));
    // ... then with its peers: it learns of the newer primary, steps down,
    // rewinds its own write away (kept in quarantine) and follows.
    let peers = format!("{a_addr},{b_addr}");
    let old = start(
        pdir.path(),
        &["--listen", &p_addr, "--peers", &peers, "--node-id", "p"],
    );
    wait_for("the old primary steps down and follows", || {
        let s = status(&old);
        (s["role"] == "replica" && s["upstream"]["host"] == winner_addr.as_str()).then_some(())
    });
    wait_converged(winner, &old);
    let mut oc = old.client();
    assert_eq!(oc.get::<_, Option<i64>>("split-brain").unwrap(), None);
    assert_eq!(oc.get::<_, i64>("after49").unwrap(), 49);
    let s = status(&old);
    // A rewind per shard it wrote past the fork on (the split-brain write,
    // and records of the load it had not acknowledged).
    assert!(s["upstream"]["rewinds"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["epoch"], new_epoch, "{s}");
    // Silent while it rewound, it asked whether it could stand (a
    // pre-vote), was told no by nodes that hear their primary, and went on
    // following: it never stopped to stand.
    assert_eq!(s["failover"]["elections"], 0, "{s}");
    let kept = quarantined(&old.dir);
    assert!(kept.iter().any(|f| f.ends_with("REWIND.txt")), "{kept:?}");

    // Restarted once more with its first configuration (a primary), its log
    // now in the winner's epoch: it does not lead that epoch, it stands by
    // and follows the winner again.
    assert_eq!(old.terminate().code(), Some(0));
    let old = start(
        pdir.path(),
        &["--listen", &p_addr, "--peers", &peers, "--node-id", "p"],
    );
    let err = old
        .client()
        .set::<_, _, ()>("x", 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("read only replica"), "{err}");
    wait_for("it follows the winner again", || {
        let s = status(&old);
        (s["role"] == "replica" && s["upstream"]["host"] == winner_addr.as_str()).then_some(())
    });
    wc.set::<_, _, ()>("last", 1).unwrap();
    wait_converged(winner, &old);
    eprintln!(
        "failover: {} writes acknowledged before the kill, elected after {:.2} s",
        acked.len(),
        elected_after.as_secs_f64()
    );
}

#[test]
fn a_node_that_voted_never_acknowledges_for_an_older_primary_even_after_a_restart() {
    let (pdir, vdir) = (disk_dir(), disk_dir());
    let primary = start(
        pdir.path(),
        &["--node-id", "p", "--commit-timeout-ms", "1000"],
    );
    let proxy = Proxy::start(primary.listen);
    let upstream = proxy.addr.to_string();
    let replica_args = ["--replica-of", upstream.as_str(), "--node-id", "v"];
    let v = start(vdir.path(), &replica_args);
    let mut c = primary.client();
    let _: () = c.set("before", 1).unwrap();
    let epoch = status(&primary)["epoch"].as_u64().unwrap();

    // Cut off from its primary for longer than the election timeout, the
    // replica gives its vote to a candidate of a newer epoch.
    proxy.cut();
    let (granted, why) = wait_for(
        "the replica votes once it no longer hears its primary",
        || {
            let answer = vote(&v, epoch + 1, "127.0.0.1:1", epoch);
            (answer.0 == 1).then_some(answer)
        },
    );
    assert_eq!((granted, why.as_str()), (1, "granted"));
    let s = status(&v);
    assert_eq!(s["failover"]["vote_epoch"], epoch + 1, "{s}");
    assert_eq!(s["failover"]["voted_for"], "127.0.0.1:1", "{s}");

    // Restarted, with its old configuration, and the link healed: it does
    // not follow the primary of the older epoch, so a replicated(1) write
    // there is not acknowledged.
    assert_eq!(v.terminate().code(), Some(0));
    proxy.heal();
    let v = start(vdir.path(), &replica_args);
    wait_for("the restarted replica has tried its upstream", || {
        let s = status(&v);
        (s["upstream"]["connected"] == true || !s["upstream"]["last_error"].is_null()).then_some(())
    });
    let err = c.set::<_, _, ()>("after", 1).unwrap_err().to_string();
    assert!(err.contains("TIMEOUT"), "{err}");
    let s = status(&primary);
    assert_eq!(s["replicas"][0]["status"], "disconnected", "{s}");
    let s = status(&v);
    let why = s["upstream"]["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("voted in epoch"), "{s}");
    assert_eq!(
        s["failover"]["vote_epoch"],
        epoch + 1,
        "the vote was kept: {s}"
    );

    // A vote file it cannot read would make it forget the vote: it does
    // not start.
    assert_eq!(v.terminate().code(), Some(0));
    std::fs::write(vdir.path().join("vote"), "garbage\n").unwrap();
    let mut args = vec!["--shards", "2"];
    args.extend_from_slice(&replica_args);
    let refused = NodeProcess::try_start(vdir.path(), &args)
        .err()
        .expect("refused");
    assert!(refused.contains("vote file"), "{refused}");
}

/// With failover peers, only a peer's acknowledgement makes a write
/// `replicated(1)`: the winner of an election gathers what the peers hold,
/// so a write held by a replica that does not vote could be lost. Without
/// peers every replica counts, as before.
#[test]
fn only_the_failover_peers_acknowledge_replicated_writes() {
    let (pdir, adir, rdir) = (disk_dir(), disk_dir(), disk_dir());
    let primary = start(
        pdir.path(),
        &["--node-id", "p", "--commit-timeout-ms", "1000"],
    );
    let p_addr = primary.listen.to_string();
    let replica = |dir: &std::path::Path, id: &str| {
        start(
            dir,
            &[
                "--replica-of",
                &p_addr,
                "--node-id",
                id,
                "--no-failover-candidate",
            ],
        )
    };
    let a = replica(adir.path(), "a");
    let outside = replica(rdir.path(), "r");
    let mut c = primary.client();
    let counts = |node: &NodeProcess| -> Vec<(String, bool)> {
        let s = status(node);
        let mut v: Vec<(String, bool)> = s["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let id = r["node_id"].as_str().unwrap().to_string();
                (id, r["counts_for_commit"].as_bool().unwrap())
            })
            .collect();
        v.sort();
        v
    };
    wait_for("both replicas attach", || {
        (counts(&primary).len() == 2).then_some(())
    });
    assert_eq!(
        counts(&primary),
        [("a".into(), true), ("r".into(), true)],
        "without peers every replica counts"
    );
    let _: () = c.set("no-peers", 1).unwrap();

    // "a" becomes the primary's only peer: its node id is asked for
    // before TIDEWAL.PEERS answers.
    let _: Vec<String> = redis::cmd("TIDEWAL.PEERS")
        .arg(a.listen.to_string())
        .query(&mut c)
        .unwrap();
    assert_eq!(counts(&primary), [("a".into(), true), ("r".into(), false)]);
    let s = status(&primary);
    assert_eq!(s["failover"]["peer_ids"][a.listen.to_string()], "a", "{s}");
    let _: () = c.set("with-a", 1).unwrap();

    // Without "a", the replica outside the peers still receives every
    // write, but it acknowledges none of them as replicated.
    assert_eq!(a.terminate().code(), Some(0));
    wait_for("the primary sees its peer gone", || {
        let s = status(&primary);
        let a = s["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["node_id"] == "a")
            .cloned()
            .unwrap();
        (a["status"] == "disconnected").then_some(())
    });
    let err = c.set::<_, _, ()>("only-r", 1).unwrap_err().to_string();
    assert!(err.contains("TIMEOUT"), "{err}");
    wait_converged(&primary, &outside);
    let held: Option<i64> = outside.client().get("only-r").unwrap();
    assert_eq!(held, Some(1), "the replica outside the peers has the write");
    let waited: i64 = redis::cmd("WAIT").arg(1).arg(200).query(&mut c).unwrap();
    assert_eq!(waited, 0, "WAIT counts as replicated(1) does");
}

/// A Sentinel port answers what Sentinel clients ask, in Sentinel's
/// shapes, and nothing else; a primary that is gone is flagged down.
#[test]
fn the_sentinel_port_answers_as_a_sentinel_and_only_as_one() {
    let (pdir, adir, wdir) = (disk_dir(), disk_dir(), disk_dir());
    let (primary, a) = primary_and_voter(pdir.path(), adir.path());
    // A warm standby serves no reads: ROLE lists it, Sentinel does not
    // offer it to clients reading from replicas.
    let p_listen = primary.listen.to_string();
    let w = start(
        wdir.path(),
        &[
            "--replica-of",
            &p_listen,
            "--node-id",
            "w",
            "--warm-standby",
        ],
    );
    let mut pc = primary.client();
    let _: () = pc.set("k", 1).unwrap();
    wait_converged(&primary, &a);
    wait_converged(&primary, &w);
    let role: (String, i64, Vec<(String, String, String)>) =
        redis::cmd("ROLE").query(&mut pc).unwrap();
    assert_eq!(role.2.len(), 2, "{role:?}");
    let mut s = sentinel_port(&a);
    let role: (String, Vec<String>) = redis::cmd("ROLE").query(&mut s).unwrap();
    assert_eq!(role, ("sentinel".to_string(), vec!["tidewal".to_string()]));
    let masters: Vec<std::collections::HashMap<String, String>> =
        redis::cmd("SENTINEL").arg("MASTERS").query(&mut s).unwrap();
    assert_eq!(masters.len(), 1);
    let m = &masters[0];
    assert_eq!(m["name"], "tidewal");
    assert_eq!(
        format!("{}:{}", m["ip"], m["port"]),
        primary.listen.to_string()
    );
    assert_eq!(m["flags"], "master");
    assert_eq!(m["num-slaves"], "1");
    let replicas: Vec<std::collections::HashMap<String, String>> = redis::cmd("SENTINEL")
        .arg("REPLICAS")
        .arg("tidewal")
        .query(&mut s)
        .unwrap();
    assert_eq!(replicas.len(), 1);
    let r = &replicas[0];
    assert_eq!(format!("{}:{}", r["ip"], r["port"]), a.listen.to_string());
    assert_eq!(r["flags"], "slave");
    assert_eq!(
        format!("{}:{}", r["master-host"], r["master-port"]),
        primary.listen.to_string()
    );
    // Another name is not known; the node's own commands are not served
    // there.
    let none: Option<Vec<String>> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg("other")
        .query(&mut s)
        .unwrap();
    assert_eq!(none, None);
    let err = redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg("other")
        .query::<()>(&mut s)
        .unwrap_err();
    assert!(err.to_string().contains("No such master"), "{err}");
    let err = redis::cmd("GET").arg("k").query::<()>(&mut s).unwrap_err();
    assert!(err.to_string().contains("Sentinel port"), "{err}");
    let err = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg("tidewal")
        .query::<()>(&mut s)
        .unwrap_err();
    assert!(err.to_string().contains("MASTERS"), "{err}");
    // Pub/sub there: subscribed, PING answers in pub/sub's shape, other
    // commands are refused, and with nothing subscribed it closes.
    let got = common::node::raw(
        a.sentinel.unwrap(),
        b"SUBSCRIBE +switch-master\r\nPING\r\nGET k\r\nUNSUBSCRIBE\r\nPING\r\n",
    );
    let text = String::from_utf8_lossy(&got);
    assert_eq!(
        text,
        "*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n\
         *2\r\n$4\r\npong\r\n$0\r\n\r\n\
         -ERR Can't execute 'get': only (P)SUBSCRIBE / (P)UNSUBSCRIBE / PING / QUIT are allowed in this context\r\n\
         *3\r\n$11\r\nunsubscribe\r\n$14\r\n+switch-master\r\n:0\r\n"
    );
    // On the client port there is no pub/sub.
    let err = redis::cmd("SUBSCRIBE")
        .arg("x")
        .query::<()>(&mut a.client())
        .unwrap_err();
    assert!(err.to_string().contains("Sentinel port"), "{err}");
    // INFO (clients check a connection is ready with it) and HELLO there
    // say it is a Sentinel.
    let info: String = redis::cmd("INFO").query(&mut s).unwrap();
    assert!(info.contains("redis_mode:sentinel"), "{info}");
    let hello: std::collections::HashMap<String, redis::Value> =
        redis::cmd("HELLO").query(&mut s).unwrap();
    assert_eq!(
        hello["mode"],
        redis::Value::BulkString(b"sentinel".to_vec()),
        "{hello:?}"
    );
    // The client port is unchanged: ROLE there is the replica's, and
    // SENTINEL is not answered there.
    let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut a.client()).unwrap();
    assert_eq!(role[0], redis::Value::BulkString(b"slave".to_vec()));
    let err = redis::cmd("SENTINEL")
        .arg("MASTERS")
        .query::<()>(&mut a.client())
        .unwrap_err();
    assert!(err.to_string().contains("Sentinel port"), "{err}");

    // The primary gone (no peers here: no election), the replica still
    // names it, flagged down, so clients look elsewhere.
    let p_addr = primary.listen.to_string();
    primary.kill9();
    let m = wait_for("the primary is flagged down", || {
        let m: std::collections::HashMap<String, String> = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg("tidewal")
            .query(&mut s)
            .unwrap();
        (m["flags"] == "master,s_down,o_down").then_some(m)
    });
    assert_eq!(format!("{}:{}", m["ip"], m["port"]), p_addr);
    // Clients that ask only for the address get a null: they ask the
    // next node.
    let addr: Option<Vec<String>> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg("tidewal")
        .query(&mut s)
        .unwrap();
    assert_eq!(addr, None);
}

/// A cascaded replica hears the primary only through its upstream, a
/// replica: that upstream's heartbeats say how long it has heard no primary,
/// so once the primary dies the cascade neither takes them for a live
/// primary nor refuses its vote for that reason. Here the cascade is the
/// only candidate: the failover needs it to stand while its upstream is
/// still streaming to it.
#[test]
fn a_cascaded_replica_stands_and_is_elected_when_the_primary_dies() {
    let (pdir, adir, cdir) = (disk_dir(), disk_dir(), disk_dir());
    let (primary, a) = primary_and_voter(pdir.path(), adir.path());
    let a_addr = a.listen.to_string();
    let hook_out = pdir.path().join("promoted.txt");
    let hook = format!(
        "echo \"$TIDEWAL_REASON $TIDEWAL_EPOCH $TIDEWAL_LISTEN\" > {}",
        hook_out.display()
    );
    let c = start(
        cdir.path(),
        &[
            "--replica-of",
            &a_addr,
            "--node-id",
            "c",
            "--on-promote",
            &hook,
        ],
    );
    let c_addr = c.listen.to_string();
    make_peers(&[&primary, &a, &c]);
    // Redis Sentinel clients, given every node as a "sentinel", find the
    // primary from any of them, the cascade included (it asks up its
    // upstreams), and ROLE lists each replica by its client port.
    let p_addr = primary.listen.to_string();
    for node in [&primary, &a, &c] {
        assert_eq!(master_addr(node), p_addr);
    }
    let role: (String, i64, Vec<(String, String, String)>) =
        redis::cmd("ROLE").query(&mut primary.client()).unwrap();
    assert_eq!(
        role.2
            .iter()
            .map(|r| format!("{}:{}", r.0, r.1))
            .collect::<Vec<_>>(),
        std::slice::from_ref(&a_addr)
    );
    let urls: Vec<String> = [&primary, &a, &c]
        .iter()
        .map(|n| format!("redis://{}/", n.sentinel.unwrap()))
        .collect();
    let mut sentinel = redis::sentinel::SentinelClient::build(
        urls,
        "tidewal".to_string(),
        None,
        redis::sentinel::SentinelServerType::Master,
    )
    .unwrap();
    let _: () = sentinel
        .get_connection()
        .unwrap()
        .set("via-sentinel", 1)
        .unwrap();
    // And clients that wait for Sentinel's `+switch-master` (Jedis) hear
    // of the failover: subscribed on the voter's Sentinel port.
    let mut notified = sentinel_port(&a);
    let mut notified = notified.as_pubsub();
    notified.subscribe("+switch-master").unwrap();
    notified
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let epoch = status(&primary)["epoch"].as_u64().unwrap();
    let mut pc = primary.client();
    let mut acked = Vec::new();
    for i in 0..300 {
        let key = format!("k{i}");
        let _: () = pc.set(&key, i).unwrap();
        acked.push(key);
    }
    wait_converged(&primary, &c);
    // Through its upstream it hears the primary: no vote deposes it.
    let heard = status(&c)["failover"]["primary_silence_ms"]
        .as_u64()
        .unwrap();
    assert!(heard < 1000, "{heard} ms");
    assert_eq!(status(&primary)["failover"]["primary_silence_ms"], 0);
    let (granted, why) = vote(&c, epoch + 5, "127.0.0.1:1", epoch);
    assert_eq!(granted, 0);
    assert!(why.contains("through it a primary"), "{why}");
    // Except to its upstream: a candidate stands because it heard no
    // primary, so what the cascade hears through it says nothing (asked
    // with PRE: nothing is taken).
    let answer: Vec<redis::Value> = redis::cmd("TIDEWAL.VOTE")
        .arg(epoch + 5)
        .arg(&a_addr)
        .arg(epoch)
        .arg("PRE")
        .query(&mut c.client())
        .unwrap();
    assert_eq!(answer[0], redis::Value::Int(1), "{answer:?}");
    assert_eq!(status(&c)["failover"]["vote_epoch"], 0);

    let mut primary = primary;
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    let killed = Instant::now();
    wait_for("the cascaded replica is elected", || {
        (status(&c)["role"] == "primary").then_some(())
    });
    let elected_after = killed.elapsed();
    let s = status(&c);
    assert!(s["epoch"].as_u64().unwrap() > epoch, "{s}");
    assert_eq!(s["failover"]["won"], 1, "{s}");
    // Its on_promote hook ran (where DNS would be pointed at it).
    let want = format!("elected {} {c_addr}\n", s["epoch"]);
    wait_for("the on_promote hook ran", || {
        (std::fs::read_to_string(&hook_out).unwrap_or_default() == want).then_some(())
    });
    assert_eq!(status(&a)["failover"]["elections"], 0, "a never stands");
    wait_for("its old upstream follows it", || {
        let s = status(&a);
        (s["upstream"]["host"] == c_addr.as_str() && s["upstream"]["connected"] == true)
            .then_some(())
    });
    // The same Sentinel client finds the new primary (the old one's
    // address no longer answers; the others name the cascade).
    for node in [&a, &c] {
        assert_eq!(master_addr(node), c_addr);
    }
    let mut via = wait_for("a Sentinel client finds the new primary", || {
        sentinel.get_connection().ok()
    });
    let message = notified.get_message().unwrap();
    assert_eq!(message.get_channel_name(), "+switch-master");
    let payload: String = message.get_payload().unwrap();
    let (old, new) = (primary.listen, c.listen);
    assert_eq!(
        payload,
        format!(
            "tidewal {} {} {} {}",
            old.ip(),
            old.port(),
            new.ip(),
            new.port()
        )
    );
    let _: () = via.set("via-sentinel-after", 1).unwrap();
    let mut cc = c.client();
    assert_eq!(cc.get::<_, i64>("via-sentinel-after").unwrap(), 1);
    assert_eq!(cc.get::<_, i64>("via-sentinel").unwrap(), 1);
    for key in &acked {
        assert!(
            cc.get::<_, Option<i64>>(key).unwrap().is_some(),
            "acknowledged {key} was lost"
        );
    }
    let _: () = cc.set("after", 1).unwrap();
    wait_converged(&c, &a);
    eprintln!(
        "cascade failover: elected after {:.2} s",
        elected_after.as_secs_f64()
    );
}

/// `tidewal bench failover` runs end to end: a failover on new nodes, its
/// times, and the acknowledged writes it checked (the harness, not its
/// figures: performance is measured by running it).
#[test]
fn bench_failover_measures_a_failover_end_to_end() {
    let (ok, stdout) = common::node::tidewal(&[
        "bench",
        "failover",
        "--runs",
        "1",
        "--seconds",
        "0.5",
        "--cascade",
        "--writers",
        "2",
    ]);
    assert!(ok, "{stdout}");
    assert!(stdout.contains("run  1: "), "{stdout}");
    assert!(
        stdout.contains("new primary elected, seconds after the kill"),
        "{stdout}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("acknowledged writes: "))
        .expect(&stdout);
    let acked: u64 = line["acknowledged writes: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(acked > 0, "{stdout}");
    assert!(line.ends_with(", 0 lost"), "{stdout}");
}
