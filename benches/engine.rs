//! Embedded engine benchmark: tidewal against fjall (an LSM engine a Rust
//! user would pick instead), same disk, same workload, same run.
//!
//! `cargo bench --bench engine` (env: TIDEWAL_BENCH_SECONDS per point,
//! default 2; TIDEWAL_BENCH_KEYS for the load, default 200000).
//!
//! Durable puts: every tidewal put waits for its WAL sync (`local`); every
//! fjall put is followed by `persist(SyncData)`, fjall's synced commit.
//! Writers are OS threads for both. Figures are medians of 3 runs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{env, median, rss_bytes};
use hdrhistogram::Histogram;
use tidewal::engine::{Engine, Options, block_on};

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds")
}

/// `n` threads calling `op(thread, i)` for `seconds`; returns ops/s, p50, p99 (us).
fn closed_loop(
    n: usize,
    seconds: Duration,
    op: Arc<dyn Fn(usize, u64) + Send + Sync>,
) -> (f64, f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|t| {
            let (stop, op) = (stop.clone(), op.clone());
            std::thread::spawn(move || {
                let mut hist = histogram();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    op(t, i);
                    hist.record(t0.elapsed().as_nanos() as u64).unwrap();
                    i += 1;
                }
                hist
            })
        })
        .collect();
    std::thread::sleep(seconds);
    stop.store(true, Ordering::Relaxed);
    let mut hist = histogram();
    for t in threads {
        hist.add(t.join().unwrap()).unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    (
        hist.len() as f64 / elapsed,
        hist.value_at_quantile(0.5) as f64 / 1e3,
        hist.value_at_quantile(0.99) as f64 / 1e3,
    )
}

fn options() -> Options {
    Options::new().with_spin_before_park_us(env("TIDEWAL_BENCH_SPIN_US", 0))
}

fn key(t: usize, i: u64) -> Vec<u8> {
    format!("k{t:03}{i:012}").into_bytes() // 16 bytes
}

const VALUE: [u8; 100] = [0x61; 100];

fn main() {
    let seconds = Duration::from_secs(env("TIDEWAL_BENCH_SECONDS", 2));
    let keys = env("TIDEWAL_BENCH_KEYS", 200_000);
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-engine");
    let _ = std::fs::remove_dir_all(&root);
    println!(
        "tidewal vs fjall, {} per point, medians of 3, dir {}",
        seconds.as_secs(),
        root.display()
    );
    println!("\ndurable puts (16-byte keys, 100-byte values)");
    println!(
        "  {:>7} {:>12} {:>8} {:>8} {:>12} {:>8} {:>8} {:>7}",
        "writers", "tidewal/s", "p50 us", "p99 us", "fjall/s", "p50 us", "p99 us", "ratio"
    );
    for n in [1usize, 8, 64, 256] {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for run in 0..3 {
            let dir = root.join(format!("tw-{n}-{run}"));
            let engine = Engine::open(&dir, options()).unwrap();
            let e = engine.clone();
            ours.push(closed_loop(
                n,
                seconds,
                Arc::new(move |t, i| {
                    block_on(e.put(key(t, i), &VALUE[..])).unwrap();
                }),
            ));
            block_on(engine.close()).unwrap();
            drop(engine);
            let _ = std::fs::remove_dir_all(&dir);

            let dir = root.join(format!("fj-{n}-{run}"));
            let db = fjall::Database::builder(&dir).open().unwrap();
            let ks = db
                .keyspace("bench", fjall::KeyspaceCreateOptions::default)
                .unwrap();
            let db2 = db.clone();
            theirs.push(closed_loop(
                n,
                seconds,
                Arc::new(move |t, i| {
                    ks.insert(key(t, i), &VALUE[..]).unwrap();
                    db2.persist(fjall::PersistMode::SyncData).unwrap();
                }),
            ));
            drop(db);
            let _ = std::fs::remove_dir_all(&dir);
        }
        let m = |v: &Vec<(f64, f64, f64)>, f: fn(&(f64, f64, f64)) -> f64| {
            median(v.iter().map(f).collect())
        };
        let (o, t) = (m(&ours, |r| r.0), m(&theirs, |r| r.0));
        println!(
            "  {n:>7} {o:>12.0} {:>8.1} {:>8.1} {t:>12.0} {:>8.1} {:>8.1} {:>7.2}",
            m(&ours, |r| r.1),
            m(&ours, |r| r.2),
            m(&theirs, |r| r.1),
            m(&theirs, |r| r.2),
            o / t
        );
    }

    // Load `keys` keys into each, then reads, scans, restart and memory.
    println!("\nloaded {keys} keys");
    let dir = root.join("tw-load");
    let before = rss_bytes();
    let engine = Engine::open(&dir, options()).unwrap();
    let loaders: Vec<_> = (0..64)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                for i in (t as u64..keys).step_by(64) {
                    block_on(engine.put(key(0, i), &VALUE[..])).unwrap();
                }
            })
        })
        .collect();
    loaders.into_iter().for_each(|l| l.join().unwrap());
    let mem_per_million = (rss_bytes().saturating_sub(before)) as f64 * 1e6 / keys as f64;

    let fdir = root.join("fj-load");
    let db = fjall::Database::builder(&fdir).open().unwrap();
    let ks = db
        .keyspace("bench", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    for i in 0..keys {
        ks.insert(key(0, i), &VALUE[..]).unwrap();
    }
    db.persist(fjall::PersistMode::SyncData).unwrap();

    let e = engine.clone();
    let (our_gets, _, _) = closed_loop(
        8,
        seconds,
        Arc::new(move |t, i| {
            let k = key(0, (i * 7919 + t as u64 * 104729) % keys);
            assert!(block_on(e.get(k)).unwrap().is_some());
        }),
    );
    let ks2 = ks.clone();
    let (their_gets, _, _) = closed_loop(
        8,
        seconds,
        Arc::new(move |t, i| {
            let k = key(0, (i * 7919 + t as u64 * 104729) % keys);
            assert!(ks2.get(k).unwrap().is_some());
        }),
    );
    println!(
        "  gets/s, 8 threads        tidewal {our_gets:>12.0}   fjall {their_gets:>12.0}   ratio {:.2}",
        our_gets / their_gets
    );

    let t0 = Instant::now();
    let all = block_on(engine.scan("", None, usize::MAX)).unwrap();
    let bytes: usize = all.iter().map(|(k, v)| k.len() + v.len()).sum();
    let our_scan = bytes as f64 / 1e6 / t0.elapsed().as_secs_f64();
    assert_eq!(all.len() as u64, keys);
    let t0 = Instant::now();
    let mut fbytes = 0;
    for kv in ks.iter() {
        let (k, v) = kv.into_inner().unwrap();
        fbytes += k.len() + v.len();
    }
    let their_scan = fbytes as f64 / 1e6 / t0.elapsed().as_secs_f64();
    println!(
        "  full scan MB/s           tidewal {our_scan:>12.0}   fjall {their_scan:>12.0}   ratio {:.2}",
        our_scan / their_scan
    );
    println!(
        "  resident memory per million keys (tidewal): {:.0} MiB",
        mem_per_million / (1 << 20) as f64
    );
    drop(all);

    block_on(engine.close()).unwrap();
    drop(engine);
    // Logical WAL bytes: one record per put (32-byte record header, 8-byte
    // batch header, 12-byte op header, key, value); segment files themselves
    // are preallocated.
    let wal_bytes = keys * (32 + 8 + 12 + 16 + 100);
    let t0 = Instant::now();
    let engine = Engine::open(&dir, options()).unwrap();
    let wal_restart = t0.elapsed().as_secs_f64();
    block_on(engine.snapshot()).unwrap();
    block_on(engine.close()).unwrap();
    drop(engine);
    let snap_bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|e| std::fs::read_dir(e.path()).unwrap().flatten())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let t0 = Instant::now();
    let engine = Engine::open(&dir, options()).unwrap();
    let snap_restart = t0.elapsed().as_secs_f64();
    block_on(engine.close()).unwrap();
    let gib = (1u64 << 30) as f64;
    println!(
        "  restart from WAL        {wal_restart:.2} s for {:.0} MiB: {:.1} s per GiB",
        wal_bytes as f64 / (1 << 20) as f64,
        wal_restart * gib / wal_bytes as f64
    );
    println!(
        "  restart from snapshot   {snap_restart:.2} s for {:.0} MiB: {:.1} s per GiB",
        snap_bytes as f64 / (1 << 20) as f64,
        snap_restart * gib / snap_bytes.max(1) as f64
    );
    drop(db);
    let _ = std::fs::remove_dir_all(&root);
}
