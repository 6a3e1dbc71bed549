//! The process-crash path on the real disk: `tidewal wal stress` appends from
//! many tasks and prints each ack after its sync; it is killed with SIGKILL
//! at a random moment; every printed ack must then be found by recovery,
//! with its bytes, and nothing that was never written.
//!
//! `TIDEWAL_KILL_RUNS=N` sets the number of kills (default 4).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tidewal::format::SegmentHeader;
use tidewal::{DirectIo, DmaStorage, Wal, WalOptions};

/// Starts the stress tool, lets it ack at least `acks` appends, kills it, and
/// returns every ack it printed: `(who, seq) -> lsn`.
fn run_and_kill(
    dir: &std::path::Path,
    acks: usize,
    appenders: usize,
) -> HashMap<(usize, usize), u64> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidewal"))
        .args([
            "wal",
            "stress",
            "--segment-bytes",
            "262144",
            "--body-bytes",
            "200",
        ])
        .args(["--appenders", &appenders.to_string()])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tidewal wal stress");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = HashMap::new();
    let started = Instant::now();
    while acked.len() < acks && started.elapsed() < Duration::from_secs(30) {
        let Some(Ok(line)) = lines.next() else { break };
        record_ack(&line, &mut acked);
    }
    child.kill().expect("SIGKILL");
    // Acks printed before the kill are still in the pipe.
    for line in lines.map_while(Result::ok) {
        record_ack(&line, &mut acked);
    }
    child.wait().unwrap();
    acked
}

fn record_ack(line: &str, acked: &mut HashMap<(usize, usize), u64>) {
    let parts: Vec<&str> = line.split_whitespace().collect();
    if let ["ack", who, seq, lsn] = parts[..] {
        acked.insert(
            (who.parse().unwrap(), seq.parse().unwrap()),
            lsn.parse().unwrap(),
        );
    }
}

#[test]
fn kill_9_loses_no_acked_append() {
    let runs = runs("KILL_RUNS", 4);
    let dir = disk_dir();
    let mut rng = Rng(0x6b696c6c);
    let mut all_acked: HashMap<(usize, usize), u64> = HashMap::new();
    for round in 0..runs {
        // Appender ids repeat across rounds, so acks are keyed by round too
        // and matched by LSN: every earlier round's acks must survive later
        // crashes as well.
        let acked = run_and_kill(dir.path(), 200 + rng.below(3000) as usize, 8);
        assert!(
            !acked.is_empty(),
            "round {round}: the stress tool acked nothing"
        );
        for ((who, seq), lsn) in acked {
            all_acked.insert((who + 100 * round as usize, seq), lsn);
        }
        let p = dir.path().to_path_buf();
        let acked = all_acked.clone();
        let found = run(move || async move { recover_and_check(&p, &acked, round).await });
        assert!(found >= all_acked.len(), "round {round}");
    }
}

/// Opens the log as recovery would and checks every ack against it; returns
/// the number of records found.
async fn recover_and_check(
    dir: &std::path::Path,
    acked: &HashMap<(usize, usize), u64>,
    round: u64,
) -> usize {
    let first = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .min()
        .expect("a segment exists");
    let log =
        SegmentHeader::peek_log(&std::fs::read(first).unwrap()).expect("first header is sound");
    let storage = DmaStorage::open(dir, DirectIo::Require).await.unwrap();
    let wal = Wal::open(storage, WalOptions::new(log))
        .await
        .unwrap_or_else(|e| panic!("round {round}: recovery refused after kill -9: {e}"));
    let records = read_all_records(&wal).await;
    let by_lsn: HashMap<u64, &[u8]> = records.iter().map(|r| (r.lsn, &r.body[..])).collect();
    for r in &records {
        assert!(
            parse_body(&r.body).is_some(),
            "round {round}: lsn {} holds bytes never written",
            r.lsn
        );
    }
    for ((who, seq), lsn) in acked {
        let body = by_lsn
            .get(lsn)
            .unwrap_or_else(|| panic!("round {round}: acked lsn {lsn} lost"));
        let (w, s) = parse_body(body).unwrap();
        assert_eq!(
            (w, s),
            (who % 100, *seq),
            "round {round}: lsn {lsn} holds another record"
        );
    }
    wal.close().await.unwrap();
    records.len()
}
