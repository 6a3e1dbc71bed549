//! The durability promise at the server: a write whose reply was `+OK`
//! survives `kill -9` of the node, however many clients were pipelining.
//! Each run: clients write unique values in pipelines and record every
//! acknowledged write; the node is killed at a random moment; after a
//! restart every acknowledged write is there (or was overwritten by a later
//! write of the same client), and every value read is one that some client
//! sent. `TIDEWAL_NODE_CRASH_RUNS` sets the number of runs (default 3).

#[macro_use]
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::node::NodeProcess;
use common::{Rng, disk_dir, runs};
use redis::Commands;

const CLIENTS: usize = 8;
const KEYS_PER_CLIENT: u64 = 50;

#[test]
fn acked_writes_survive_kill_9_under_concurrent_pipelines() {
    let total = runs("NODE_CRASH_RUNS", 3);
    eprintln!("{total} runs (TIDEWAL_NODE_CRASH_RUNS)");
    let mut rng = Rng(0xc0ffee ^ total);
    for run in 0..total {
        let dir = disk_dir();
        let node = NodeProcess::start(dir.path(), &["--shards", "4"]);
        let stop = Arc::new(AtomicBool::new(false));
        // Per client: key -> highest sequence number acknowledged.
        let acked: Arc<Mutex<Vec<HashMap<String, u64>>>> =
            Arc::new(Mutex::new(vec![HashMap::new(); CLIENTS]));
        let url = node.url();
        let workers: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let (stop, acked, url) = (stop.clone(), acked.clone(), url.clone());
                std::thread::spawn(move || {
                    let Ok(mut c) = redis::Client::open(url).and_then(|c| c.get_connection())
                    else {
                        return;
                    };
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let mut pipe = redis::pipe();
                        let mut batch = Vec::new();
                        for _ in 0..16 {
                            seq += 1;
                            let key = format!("c{client}:k{}", seq % KEYS_PER_CLIENT);
                            pipe.set(&key, format!("{client}:{seq}")).ignore();
                            batch.push((key, seq));
                        }
                        // The node dies under us sooner or later.
                        if pipe.query::<()>(&mut c).is_err() {
                            return;
                        }
                        let mut acked = acked.lock().unwrap();
                        for (key, seq) in batch {
                            acked[client].insert(key, seq);
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
        node.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        let acked_count: usize = acked.iter().map(HashMap::len).sum();
        assert!(
            acked_count > 0,
            "run {run}: no write was acknowledged before the kill"
        );

        let node = NodeProcess::start(dir.path(), &["--shards", "4"]);
        let mut c = node.client();
        for (client, keys) in acked.iter().enumerate() {
            for (key, &seq) in keys {
                let value: Option<String> = c.get(key).unwrap();
                let value = value.unwrap_or_else(|| panic!("run {run}: acked {key} is gone"));
                let (who, got) = value.split_once(':').expect("a value some client wrote");
                let got: u64 = got.parse().expect("a value some client wrote");
                assert_eq!(
                    who,
                    client.to_string(),
                    "run {run}: {key} holds another client's value"
                );
                // Later writes of the same key may have landed without
                // their ack reaching the client; earlier ones may not win.
                assert!(
                    got >= seq,
                    "run {run}: {key} went back from acked {seq} to {got}"
                );
            }
        }
        drop(node);
    }
}
