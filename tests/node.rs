//! The real `tidewal node` binary, driven by real clients: the `redis`
//! client library, `redis-cli` and `redis-benchmark`.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::process::Command;

use common::disk_dir;
use common::node::{NodeProcess, config_file, raw, tool};
use redis::Commands;

#[test]
fn values_round_trip_through_a_client_library() {
    let dir = disk_dir();
    let node = NodeProcess::start(dir.path(), &["--shards", "4"]);
    let mut c = node.client();
    let _: () = redis::cmd("PING").query(&mut c).unwrap();
    // Binary-safe keys and values, including CRLF and zeros.
    let value: Vec<u8> = (0..=255u8).chain(b"\r\n\0".iter().copied()).collect();
    let _: () = c.set(b"bin\r\nkey\0", &value).unwrap();
    let got: Vec<u8> = c.get(b"bin\r\nkey\0").unwrap();
    assert_eq!(got, value);
    let missing: Option<String> = c.get("missing").unwrap();
    assert_eq!(missing, None);

    // Counters are atomic read-modify-writes.
    assert_eq!(c.incr::<_, _, i64>("n", 1).unwrap(), 1);
    assert_eq!(c.incr::<_, _, i64>("n", 41).unwrap(), 42);
    assert_eq!(c.decr::<_, _, i64>("n", 2).unwrap(), 40);
    let err = c.incr::<_, _, i64>("bin\r\nkey\0", 1).unwrap_err();
    assert!(err.to_string().contains("not an integer"), "{err}");

    // MSET/MGET/EXISTS/DEL.
    let _: () = redis::cmd("MSET")
        .arg(&["a", "1", "b", "2", "c", "3"])
        .query(&mut c)
        .unwrap();
    let values: Vec<Option<String>> = c.mget(&["a", "b", "zz", "c"]).unwrap();
    assert_eq!(
        values,
        vec![Some("1".into()), Some("2".into()), None, Some("3".into())]
    );
    assert_eq!(c.exists::<_, i64>(&["a", "b", "zz"]).unwrap(), 2);
    assert_eq!(c.del::<_, i64>(&["a", "zz"]).unwrap(), 1);
    assert_eq!(c.exists::<_, i64>("a").unwrap(), 0);

    // SET NX / XX; expiry options are refused by name.
    let set_nx: Option<String> = redis::cmd("SET")
        .arg("b")
        .arg("x")
        .arg("NX")
        .query(&mut c)
        .unwrap();
    assert_eq!(set_nx, None);
    let set_xx: Option<String> = redis::cmd("SET")
        .arg("b")
        .arg("x")
        .arg("XX")
        .query(&mut c)
        .unwrap();
    assert_eq!(set_xx.as_deref(), Some("OK"));
    let ex = redis::cmd("SET")
        .arg("e")
        .arg("1")
        .arg("EX")
        .arg(10)
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(ex.to_string().contains("not supported"), "{ex}");
    let unknown = redis::cmd("LPUSH")
        .arg("l")
        .arg("1")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(unknown.to_string().contains("unknown command"), "{unknown}");

    // A pipeline of writes, then reads of them in the same pipeline.
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.set(format!("p:{i:04}"), i).ignore();
    }
    for i in 0..500 {
        pipe.get(format!("p:{i:04}"));
    }
    let read: Vec<i64> = pipe.query(&mut c).unwrap();
    assert_eq!(read, (0..500).collect::<Vec<i64>>());

    // SCAN with MATCH and COUNT walks every key exactly once.
    let mut seen: Vec<String> = c.scan_match("p:*").unwrap().map(Result::unwrap).collect();
    seen.sort();
    assert_eq!(
        seen,
        (0..500).map(|i| format!("p:{i:04}")).collect::<Vec<_>>()
    );
    let mut cursor = 0u64;
    let mut pages = 0;
    let mut all = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("p:00*")
            .arg("COUNT")
            .arg(7)
            .query(&mut c)
            .unwrap();
        all.extend(keys);
        pages += 1;
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    assert_eq!(all.len(), 100);
    assert!(pages > 1, "COUNT paginates");

    // A cursor may be continued on another connection (pooled clients).
    let (cursor, first): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg("p:*")
        .arg("COUNT")
        .arg(100)
        .query(&mut c)
        .unwrap();
    let mut other = node.client();
    let (_, second): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg("p:*")
        .arg("COUNT")
        .arg(100)
        .query(&mut other)
        .unwrap();
    assert_eq!((first.len(), second.len()), (100, 100));
    assert!(
        first.last().unwrap() < second.first().unwrap(),
        "continues in order"
    );
    let long = redis::cmd("KEYS")
        .arg("*".repeat(5000))
        .query::<Vec<String>>(&mut c)
        .unwrap_err();
    assert!(long.to_string().contains("pattern"), "{long}");

    // KEYS answers as of its place in a pipeline: a later SET is not in it.
    let (keys, ()): (Vec<String>, ()) = redis::pipe()
        .cmd("KEYS")
        .arg("late*")
        .cmd("SET")
        .arg("late")
        .arg(1)
        .query(&mut c)
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    let _: i64 = c.del("late").unwrap();

    // A key over the engine's limit is refused as such; the shard goes on.
    let err = redis::cmd("SET")
        .arg(vec![b'k'; 100 << 10])
        .arg(1)
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(err.to_string().contains("over the limit"), "{err}");
    let _: () = c.set("after-big", 1).unwrap();
    let _: i64 = c.del("after-big").unwrap();

    let size: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(size, 500 + 4);
    let info: String = redis::cmd("INFO").query(&mut c).unwrap();
    for field in [
        "# Server",
        "# Replication",
        "role:master",
        "# Persistence",
        "commit_level:local",
        "# Stats",
        "total_commands_processed:",
        "db0:keys=504",
    ] {
        assert!(info.contains(field), "INFO lacks {field}:\n{info}");
    }
    let role: (String, i64, Vec<String>) = redis::cmd("ROLE").query(&mut c).unwrap();
    assert_eq!(role.0, "master");
    assert!(role.1 > 0);
    let waited: i64 = redis::cmd("WAIT").arg(0).arg(0).query(&mut c).unwrap();
    assert_eq!(waited, 0);
    let waited: i64 = redis::cmd("WAIT").arg(1).arg(50).query(&mut c).unwrap();
    assert_eq!(waited, 0, "no replica can ack");
    let config: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("append*")
        .query(&mut c)
        .unwrap();
    assert_eq!(config, ["appendonly", "yes", "appendfsync", "always"]);
    let _: Vec<String> = redis::cmd("COMMAND").arg("DOCS").query(&mut c).unwrap();

    // A connection may choose its own commit level.
    let level: String = redis::cmd("CLIENT")
        .arg("COMMIT-LEVEL")
        .query(&mut c)
        .unwrap();
    assert_eq!(level, "local");
    let _: () = redis::cmd("CLIENT")
        .arg("COMMIT-LEVEL")
        .arg("memory")
        .query(&mut c)
        .unwrap();
    let level: String = redis::cmd("CLIENT")
        .arg("COMMIT-LEVEL")
        .query(&mut c)
        .unwrap();
    assert_eq!(level, "memory");
    let _: () = c.set("fast", 1).unwrap();
    let other_level: String = redis::cmd("CLIENT")
        .arg("COMMIT-LEVEL")
        .query(&mut other)
        .unwrap();
    assert_eq!(other_level, "local", "per connection");
    let bad = redis::cmd("CLIENT")
        .arg("COMMIT-LEVEL")
        .arg("sometimes")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(bad.to_string().contains("unknown commit level"), "{bad}");
    let _: i64 = c.del("fast").unwrap();

    // The inline form redis-benchmark and telnet use.
    assert_eq!(
        raw(node.listen, b"PING\r\nget n\r\nQUIT\r\n"),
        b"+PONG\r\n$2\r\n40\r\n+OK\r\n"
    );
    assert_eq!(node.terminate().code(), Some(0));
}

#[test]
fn restart_keeps_every_acked_key_even_after_kill_9() {
    let dir = disk_dir();
    let node = NodeProcess::start(dir.path(), &[]);
    let mut c = node.client();
    for i in 0..300 {
        let _: () = c.set(format!("k{i}"), format!("v{i}")).unwrap();
    }
    // Acked (durable) then the process dies without a chance to flush. The
    // node comes back on the same port at once, though the connections of
    // its previous life linger in TIME_WAIT.
    let port = node.listen.to_string();
    node.kill9();
    let node = NodeProcess::start(dir.path(), &["--listen", &port]);
    assert_eq!(node.listen.to_string(), port);
    let mut c = node.client();
    for i in 0..300 {
        let v: Option<String> = c.get(format!("k{i}")).unwrap();
        assert_eq!(v, Some(format!("v{i}")), "acked key k{i} lost");
    }
    // And a clean stop keeps what a memory-level node acked, too.
    assert_eq!(node.terminate().code(), Some(0));
    let node = NodeProcess::start(dir.path(), &["--commit-level", "memory"]);
    let mut c = node.client();
    for i in 0..300 {
        let _: () = c.set(format!("m{i}"), i).unwrap();
    }
    assert_eq!(node.terminate().code(), Some(0));
    let node = NodeProcess::start(dir.path(), &[]);
    let mut c = node.client();
    let size: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(size, 600);
}

#[test]
fn sigterm_answers_what_was_sent_and_every_ok_is_durable() {
    let dir = disk_dir();
    let node = NodeProcess::start(dir.path(), &[]);
    let mut s = std::net::TcpStream::connect(node.listen).unwrap();
    // The connection is being served before the pipeline goes out.
    s.write_all(b"PING\r\n").unwrap();
    let mut pong = [0u8; 7];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
    let mut pipeline = Vec::new();
    for i in 0..2000 {
        let (k, v) = (format!("s{i}"), format!("{i}"));
        pipeline.extend(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                k.len(),
                v.len()
            )
            .bytes(),
        );
    }
    s.write_all(&pipeline).unwrap();
    // SIGTERM while the pipeline is being committed.
    let pid = node.child.id();
    let dir_path = node.dir.clone();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let mut replies = Vec::new();
    let _ = s.read_to_end(&mut replies);
    assert!(replies.len() % 5 == 0 && replies.chunks(5).all(|r| r == b"+OK\r\n"));
    let oks = replies.len() / 5;
    eprintln!("{oks} of 2000 writes acked before the node stopped");
    let mut node = node;
    let status = node.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "clean exit");
    std::mem::forget(node);
    let node = NodeProcess::start(&dir_path, &[]);
    let mut c = node.client();
    for i in 0..oks {
        let v: Option<String> = c.get(format!("s{i}")).unwrap();
        assert_eq!(v, Some(i.to_string()), "s{i} was acked but is gone");
    }
}

#[test]
fn redis_cli_and_redis_benchmark_work() {
    let (Some(cli), Some(bench)) = (tool("redis-cli"), tool("redis-benchmark")) else {
        return;
    };
    let dir = disk_dir();
    let node = NodeProcess::start(dir.path(), &[]);
    let port = node.listen.port().to_string();
    let cli_run = |args: &[&str]| {
        let out = Command::new(&cli)
            .args(["-p", &port])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli_run(&["set", "greeting", "hello world"]), "OK");
    assert_eq!(cli_run(&["get", "greeting"]), "hello world");
    assert_eq!(cli_run(&["ping"]), "PONG");
    assert!(cli_run(&["info", "replication"]).contains("role:master"));
    let out = Command::new(&bench)
        .args([
            "-p", &port, "-t", "set,get", "-n", "3000", "-c", "8", "-P", "16", "-d", "100", "-r",
            "1000", "-q",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SET:") && text.contains("GET:"), "{text}");
    let keys: i64 = cli_run(&["dbsize"]).parse().unwrap();
    assert!(
        keys > 1 && keys <= 1001,
        "redis-benchmark's keys landed: {keys}"
    );
    let mut c = node.client();
    let some: Vec<String> = c
        .scan_match("key:*")
        .unwrap()
        .take(1)
        .map(Result::unwrap)
        .collect();
    let value: Vec<u8> = c.get(&some[0]).unwrap();
    assert_eq!(value.len(), 100);
    assert_eq!(node.terminate().code(), Some(0));
}

#[test]
fn config_file_limits_and_refusals() {
    let dir = disk_dir();
    let config = config_file(
        dir.path(),
        "node.toml",
        "shards = 2\ncommit_level = \"local\"\n[limits]\nconnections_max = 3\n",
    );
    let data = dir.path().join("data");
    let node = NodeProcess::start(&data, &["--config", &config]);
    let held: Vec<_> = (0..3).map(|_| node.client()).collect();
    let refused = raw(node.listen, b"PING\r\n");
    assert!(String::from_utf8_lossy(&refused).contains("max number of clients"));
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut c = node.client();
    let _: () = redis::cmd("PING").query(&mut c).unwrap();

    // A second node on the same data directory is refused (LOCK), and so
    // is a node on a port someone already listens on.
    let second = NodeProcess::try_start(&data, &[]).err().expect("refused");
    assert!(second.contains("in use"), "{second}");
    let other = disk_dir();
    let taken = Command::new(env!("CARGO_BIN_EXE_tidewal"))
        .args(["node", "--data-dir"])
        .arg(other.path())
        .args(["--listen", &node.listen.to_string(), "--admin", ""])
        .output()
        .unwrap();
    assert!(!taken.status.success());
    assert!(String::from_utf8_lossy(&taken.stderr).contains("cannot listen"));

    // Bad config: unknown key, bad address, bad level.
    let config = config_file(dir.path(), "node.toml", "listne = \"x\"\n");
    let bad = Command::new(env!("CARGO_BIN_EXE_tidewal"))
        .args(["node", "--config", &config])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("listne"));
    let bad = Command::new(env!("CARGO_BIN_EXE_tidewal"))
        .args(["node", "--commit-level", "sometimes"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown commit level"));
    // Failover settings: a peer that is not HOST:PORT, a timeout shorter
    // than two heartbeats; a Sentinel port on the client port (bound with
    // SO_REUSEPORT, it would take a share of the clients).
    for (flags, says) in [
        (
            ["--peers", "127.0.0.1:7000,nonsense"],
            "\"nonsense\" is not HOST:PORT",
        ),
        (["--election-timeout-ms", "10"], "at least 1000"),
        (
            ["--sentinel", "0.0.0.0:6379"],
            "is the address of listen = \"127.0.0.1:6379\"",
        ),
    ] {
        let bad = Command::new(env!("CARGO_BIN_EXE_tidewal"))
            .args(["node", "--data-dir"])
            .arg(other.path())
            .args(flags)
            .output()
            .unwrap();
        assert!(!bad.status.success());
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn counters_are_atomic_across_connections() {
    let dir = disk_dir();
    let node = NodeProcess::start(dir.path(), &[]);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let url = node.url();
            std::thread::spawn(move || {
                let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
                // Pipelined, so increments of one key from many connections
                // meet in the same group commits.
                let mut pipe = redis::pipe();
                for i in 0..200 {
                    pipe.incr("hits", 1).ignore();
                    pipe.incr(format!("hits:{}", i % 4), 1).ignore();
                }
                let () = pipe.query(&mut c).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut c = node.client();
    assert_eq!(c.get::<_, i64>("hits").unwrap(), 1600);
    for k in 0..4 {
        assert_eq!(c.get::<_, i64>(format!("hits:{k}")).unwrap(), 400);
    }
    assert_eq!(node.terminate().code(), Some(0));
}

#[test]
fn admin_endpoint_reports_what_happened() {
    let dir = disk_dir();
    let node = NodeProcess::start(dir.path(), &["--shards", "2", "--node-id", "node-a"]);
    let mut c = node.client();
    for i in 0..50 {
        let _: () = c.set(format!("k{i}"), i).unwrap();
    }
    let (status, body) = node.get("/admin/replication/status");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["node_id"], "node-a");
    assert_eq!(doc["role"], "primary");
    assert_eq!(doc["primary"], node.listen.to_string());
    assert_eq!(doc["replicas"], serde_json::json!([]), "no replicas");
    assert!(doc["replication"].as_str().unwrap().contains("no replicas"));
    assert_eq!(doc["commit_policy"]["default_level"], "local");
    assert_eq!(doc["epoch"], 1);
    let shards = doc["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    let keys: u64 = shards.iter().map(|s| s["keys"].as_u64().unwrap()).sum();
    assert_eq!(keys, 50);
    for s in shards {
        // Every write was acknowledged at `local`: all of it is durable.
        assert_eq!(s["durable_lsn"], s["head_lsn"]);
        assert!(s["head_lsn"].as_u64().unwrap() > 0);
        assert!(s["chain"].is_u64());
    }
    assert_eq!(doc["alerts"], serde_json::json!([]));

    let (status, metrics) = node.get("/metrics");
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(value("tidewal_wal_commits_total"), 50.0, "{metrics}");
    assert_eq!(value("tidewal_keys{"), 50.0);
    assert!(value("tidewal_wal_syncs_total") >= 1.0);
    assert!(value("tidewal_wal_record_bytes_total") > 50.0 * 32.0);
    // Padding is counted within the record bytes (none here: one client).
    assert!(
        metrics.contains("tidewal_wal_pad_bytes_total{"),
        "{metrics}"
    );
    assert!(value("tidewal_wal_pad_bytes_total") < value("tidewal_wal_record_bytes_total"));
    assert!(
        metrics.contains("tidewal_wal_writes_beside_total{"),
        "{metrics}"
    );
    // One client, one write at a time: at least one write per commit
    // batch, and none beside another.
    assert!(value("tidewal_wal_writes_total") >= value("tidewal_wal_syncs_total"));
    assert_eq!(value("tidewal_wal_writes_beside_total"), 0.0);
    // No replica, so nothing reads the log by position.
    assert!(metrics.contains("tidewal_wal_reads_from_disk_total{"));
    assert_eq!(value("tidewal_wal_reads_from_memory_total"), 0.0);
    assert_eq!(value("tidewal_wal_reads_from_disk_total"), 0.0);
    assert_eq!(
        value("tidewal_wal_batch_records_count"),
        value("tidewal_wal_syncs_total")
    );
    assert_eq!(
        value("tidewal_wal_sync_duration_seconds_count"),
        value("tidewal_wal_syncs_total")
    );
    assert!(metrics.contains("tidewal_wal_sync_duration_seconds_bucket{le=\"0.001\"}"));
    // Every write's latency, once each (none is in flight now).
    assert_eq!(
        value("tidewal_wal_write_duration_seconds_count"),
        value("tidewal_wal_writes_total")
    );
    assert!(value("tidewal_wal_write_duration_seconds_sum") > 0.0);
    assert_eq!(value("tidewal_connections "), 1.0);
    assert!(metrics.trim_end().ends_with("# EOF"));
    let (status, body) = node.get("/readyz");
    assert_eq!((status, body.trim()), (200, "ready"));
    assert_eq!(node.terminate().code(), Some(0));
}

/// Clients that speak RESP3 first (redis-py 8 and others send `HELLO 3`
/// on connecting) are answered in RESP3 from then on: nulls as `_`, maps
/// as `%`; a client of the Rust redis crate in RESP3 mode works as one in
/// RESP2 does; `HELLO 2` goes back.
#[test]
fn resp3_clients_are_answered_in_resp3() {
    let dir = disk_dir();
    let node = NodeProcess::start(dir.path(), &[]);
    let url = format!("redis://{}/?protocol=resp3", node.listen);
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let _: () = c.set("k", "v").unwrap();
    assert_eq!(c.get::<_, Option<String>>("k").unwrap(), Some("v".into()));
    assert_eq!(c.get::<_, Option<String>>("missing").unwrap(), None);
    let both: Vec<Option<String>> = c.mget(&["k", "missing"]).unwrap();
    assert_eq!(both, [Some("v".to_string()), None]);
    let n: i64 = c.incr("n", 5).unwrap();
    assert_eq!(n, 5);
    let config: redis::Value = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query(&mut c)
        .unwrap();
    assert!(matches!(config, redis::Value::Map(_)), "{config:?}");

    // On the wire: what came before HELLO 3 in RESP2, what came after in
    // RESP3, and after HELLO 2 in RESP2 again.
    let got = raw(
        node.listen,
        b"GET missing\r\nHELLO 3\r\nGET missing\r\nCONFIG GET appendfsync\r\nHELLO 2\r\nGET missing\r\nQUIT\r\n",
    );
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("$-1\r\n%7\r\n$6\r\nserver\r\n$7\r\ntidewal\r\n"),
        "{text}"
    );
    assert!(text.contains("$5\r\nproto\r\n:3\r\n"), "{text}");
    assert!(
        text.contains("_\r\n%1\r\n$11\r\nappendfsync\r\n$6\r\nalways\r\n*14\r\n"),
        "{text}"
    );
    assert!(text.ends_with("$-1\r\n+OK\r\n"), "{text}");
    // A version it does not speak is refused, and the connection stays.
    let got = raw(node.listen, b"HELLO 4\r\nPING\r\nQUIT\r\n");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("-NOPROTO"), "{text}");
    assert!(text.contains("+PONG\r\n"), "{text}");
    // HELLO with no version keeps the protocol; SETNAME names the
    // connection (as CLIENT SETNAME: no spaces); AUTH is taken as Redis
    // with no password takes it (any password of the user `default`).
    let got = raw(
        node.listen,
        b"HELLO\r\nHELLO 3 AUTH default secret SETNAME app-1\r\nCLIENT GETNAME\r\nHELLO 3 SETNAME \"a b\"\r\nAUTH default x\r\nAUTH x\r\nAUTH other x\r\nQUIT\r\n",
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("*14\r\n"), "{text}");
    assert!(text.contains("$5\r\nproto\r\n:2\r\n"), "{text}");
    assert!(
        text.contains("$5\r\napp-1\r\n-ERR Client names cannot contain spaces"),
        "{text}"
    );
    assert!(
        text.contains("+OK\r\n-ERR AUTH <password> called without any password configured"),
        "{text}"
    );
    assert!(text.contains("-WRONGPASS"), "{text}");
}

/// Transactions are refused, and so is everything inside one: a client
/// sending MULTI, writes, EXEC (redis-py's default pipeline) gets errors
/// for all and EXECABORT, and nothing it sent in between is run.
#[test]
fn a_refused_transaction_runs_nothing_inside_it() {
    let dir = disk_dir();
    let node = NodeProcess::start(dir.path(), &[]);
    let got = raw(
        node.listen,
        b"MULTI\r\nSET t 1\r\nINCR n\r\nEXEC\r\nGET t\r\nEXISTS n\r\nMULTI\r\nDISCARD\r\nEXEC\r\nWATCH t\r\nQUIT\r\n",
    );
    let text = String::from_utf8_lossy(&got);
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert!(
        lines[0].starts_with(
            "-ERR MULTI is not supported, and no command will be run up to its EXEC or DISCARD"
        ),
        "{text}"
    );
    assert!(
        lines[1].starts_with("-ERR SET not run: it came inside a MULTI"),
        "{text}"
    );
    assert!(lines[2].starts_with("-ERR INCR not run"), "{text}");
    assert!(lines[3].starts_with("-EXECABORT"), "{text}");
    // Nothing was written; the connection is out of the transaction.
    assert_eq!(lines[4], "$-1", "{text}");
    assert_eq!(lines[5], ":0", "{text}");
    assert!(
        lines[6].starts_with("-ERR MULTI is not supported"),
        "{text}"
    );
    assert_eq!(lines[7], "+OK", "{text}");
    assert_eq!(lines[8], "-ERR EXEC without MULTI", "{text}");
    assert!(
        lines[9].starts_with("-ERR WATCH is not supported"),
        "{text}"
    );
    assert_eq!(lines[10], "+OK", "{text}");
    // MULTI takes no argument (and then starts nothing).
    let got = raw(node.listen, b"MULTI x\r\nGET t\r\nQUIT\r\n");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("-ERR wrong number of arguments for 'multi' command\r\n$-1\r\n"),
        "{text}"
    );
    // QUIT is never part of one: inside a refused MULTI it still closes
    // the connection (raw reads until the node closes it).
    let got = raw(node.listen, b"MULTI\r\nQUIT\r\n");
    let text = String::from_utf8_lossy(&got);
    assert!(text.ends_with("\r\n+OK\r\n"), "{text}");
}
