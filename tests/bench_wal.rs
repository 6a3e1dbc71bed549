//! `tidewal bench wal` runs end to end and reports what its README table
//! and scripts read: the disk's ceiling, and for each run its figure beside
//! the bar computed from that ceiling. Short runs: this checks the harness,
//! not the disk (performance is measured by running it, never asserted here).

mod common;

use std::process::Command;

#[test]
fn bench_wal_reports_each_run_beside_the_disk_ceiling() {
    let dir = common::disk_dir();
    let json = dir.path().join("wal.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tidewal"))
        .args(["bench", "wal", "--seconds", "0.2", "--repeat", "1"])
        .args(["--concurrency", "1,8", "--large", "4096x4", "--same-writes"])
        .arg("--dir")
        .arg(dir.path().join("scratch"))
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run tidewal");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("blocking system calls"), "{stdout}");
    assert!(
        !dir.path().join("scratch").exists(),
        "the scratch directory is removed"
    );

    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let positive = |v: &serde_json::Value, field: &str| {
        let x = v[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} in {v}"));
        assert!(x > 0.0 && x.is_finite(), "{field} = {x} in {v}");
        x
    };
    let sync_us = positive(&doc, "sync_p50_us");
    positive(&doc, "sequential_mb_per_s");
    assert_eq!(doc["spin_us"], 200, "the node's default");
    assert_eq!(
        doc["cpu"].as_u64(),
        Some(tidewal::engine::allowed_cpus()[0] as u64),
        "the first core it may run on, by default"
    );
    let runs = doc["runs"].as_array().unwrap();
    for n in [1, 8] {
        let run = runs
            .iter()
            .find(|r| r["appenders"] == n && r["record_bytes"] == 100)
            .unwrap_or_else(|| panic!("a run with {n} appenders in {doc}"));
        let appends = positive(run, "appends_per_s");
        let bar = positive(run, "bar_appends_per_s");
        let ratio = positive(run, "ratio_to_bar");
        // The bar is 0.8 x N / (sync p50) with the p50 measured right before
        // the run, which is near the one in the header on a quiet disk.
        assert!(
            bar > 0.8 * n as f64 / (sync_us * 1e-6) / 10.0,
            "bar {bar} for {n}"
        );
        // One run each (--repeat 1): the ratio is that run's figure over
        // that run's bar.
        assert!(
            (appends / bar - ratio).abs() < 1e-6 * ratio,
            "ratio {ratio} for {appends}/{bar}"
        );
        same_writes(run, "bar");
    }
    for log in ["fresh", "steady"] {
        let run = runs
            .iter()
            .find(|r| r["record_bytes"] == 4096 && r["log"] == log)
            .unwrap_or_else(|| panic!("a {log} 4 KiB run in {doc}"));
        positive(run, "mb_per_s");
        positive(run, "ceiling_mb_per_s");
        positive(run, "ratio_to_ceiling");
        // At least one 4 KiB record per write.
        let per_write = run["kib_per_write"].as_f64().expect("kib_per_write");
        assert!(per_write >= 4.0, "kib_per_write {per_write} in {run}");
        same_writes(run, "ceiling");
    }
    assert!(
        stdout.contains("uring, threads (--same-writes)"),
        "{stdout}"
    );
}

/// A row's `--same-writes` figures: one shape per run (one run here), made
/// again both ways, and the ratios they reach.
fn same_writes(run: &serde_json::Value, of: &str) {
    let shapes = run["same_writes"]
        .as_array()
        .unwrap_or_else(|| panic!("same_writes in {run}"));
    assert_eq!(shapes.len(), 1, "one per run: {run}");
    let shape = &shapes[0];
    let bytes = shape["write_bytes"].as_u64().expect("write_bytes");
    assert!(bytes >= 4096 && bytes.is_multiple_of(4096), "{shape}");
    assert!(
        shape["in_flight"].as_u64().expect("in_flight") >= 1,
        "{shape}"
    );
    let log_writes = run["writes_per_s"].as_f64().expect("writes_per_s");
    let log_ratio = run[format!("ratio_to_{of}")].as_f64().unwrap();
    for way in ["uring", "threads"] {
        let writes = shape[format!("{way}_writes_per_s")].as_f64().unwrap();
        assert!(writes > 0.0 && writes.is_finite(), "{way} in {shape}");
        // The same writes carry what the log's carried per write, over the
        // same bar: the ratios relate as the writes/s do.
        let ratio = run[format!("same_writes_{way}_ratio_to_{of}")]
            .as_f64()
            .unwrap_or_else(|| panic!("{way} ratio in {run}"));
        let expected = log_ratio * writes / log_writes;
        assert!(
            (ratio - expected).abs() < 1e-6 * expected,
            "{way}: {ratio} against {expected} in {run}"
        );
    }
}

#[test]
fn a_second_run_over_the_same_directory_is_refused_and_touches_nothing() {
    let dir = common::disk_dir();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let theirs = scratch.join("00000000000000000000.wal");
    std::fs::write(&theirs, b"a running benchmark's segment").unwrap();
    // As a first run holds it.
    let _held = tidewal::io::lock_dir(&scratch).unwrap().expect("free");
    let stderr = refused(
        &[
            "--seconds",
            "0.1",
            "--repeat",
            "1",
            "--small-only",
            "--concurrency",
            "1",
        ],
        &scratch,
    );
    assert!(
        stderr.contains("another `tidewal bench wal` is using"),
        "{stderr}"
    );
    assert!(theirs.exists(), "the first run's files are left alone");
}

/// `--cpu` picks the executor's core; a core the process may not run on is
/// refused with the cores it may, before anything is created.
#[test]
fn a_core_the_process_may_not_run_on_is_refused() {
    let dir = common::disk_dir();
    let scratch = dir.path().join("scratch");
    let stderr = refused(&["--cpu", "100000", "--small-only"], &scratch);
    assert!(
        stderr.contains("--cpu 100000: this process may run on cores"),
        "{stderr}"
    );
    assert!(!scratch.exists(), "nothing was created");
}

/// Runs `tidewal bench wal ARGS --dir DIR`, which must fail; its stderr.
fn refused(args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tidewal"))
        .args(["bench", "wal"])
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("run tidewal");
    assert!(!out.status.success(), "the run was refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
