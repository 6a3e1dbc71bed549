//! `tidewal bench wal`: durable append throughput and latency, beside the
//! disk's own ceiling measured in the same run on the same filesystem.
//!
//! The machines this runs on are shared and noisy, so the ratios (ours over
//! the disk's) are what count, every figure is the median of `--repeat` runs,
//! and every latency comes from an HDR histogram.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::json;
use tidewal::format::{LogId, RecordKind};
use tidewal::io::{StorageFile, SyncMode};
use tidewal::wal::SegmentFill;
use tidewal::{DirectIo, DmaStorage, Storage, Wal, WalOptions};

const BENCH_LOG: LogId = LogId {
    cluster_id: *b"tidewal-bench\0\0\0",
    shard: 0,
};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Scratch directory on the filesystem to measure (removed afterwards).
    /// Defaults to `.tidewal-bench` in the current directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Concurrent appenders for the small-record runs.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 8, 64, 256])]
    concurrency: Vec<usize>,
    /// Body bytes of the small records.
    #[arg(long, default_value_t = 100)]
    record_bytes: usize,
    /// Most record bytes per write + sync.
    #[arg(long, default_value_t = 1 << 20)]
    batch_bytes_max: usize,
    /// How new segments are prepared: zeros (written) or allocate (fallocate).
    #[arg(long, default_value = "zeros")]
    segment_fill: String,
    /// How the log makes writes durable: dsync (O_DSYNC writes) or
    /// fdatasync (write, then sync). The ceiling is always write + fdatasync.
    #[arg(long, default_value = "dsync")]
    sync_mode: String,
    /// Run where O_DIRECT is not in effect (tmpfs), with buffered I/O.
    #[arg(long)]
    allow_buffered: bool,
    /// Skip the large-record runs.
    #[arg(long)]
    small_only: bool,
    /// Skip the small-record runs.
    #[arg(long)]
    large_only: bool,
    /// The large-record runs, as RECORD_BYTESxAPPENDERS. Each appender
    /// keeps one record outstanding: 4096x1024 keeps 4 MiB, as 65536x64
    /// does, so the two record sizes compare at the same bytes in flight.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["4096x64".to_string(), "4096x256".to_string(), "4096x1024".to_string(), "65536x16".to_string(), "65536x64".to_string()])]
    large: Vec<String>,
    /// Microseconds the executor keeps polling before it sleeps, as
    /// `tidewal node --spin-us` (same default). 0: it sleeps at once, and
    /// each completion pays for waking it. With `--sync-mode fdatasync` it
    /// never polls, as the node's executors do not.
    #[arg(long, default_value_t = 200)]
    spin_us: u64,
    /// Core the log's executor runs on, and with it the ceiling's blocking
    /// calls. Default: the first core this process may run on. With a disk
    /// that has one interrupt line (virtio-blk, unlike NVMe), the core that
    /// takes its interrupts (`/proc/interrupts`) gives blocking calls a
    /// lower latency but a polling executor a much higher one.
    #[arg(long)]
    cpu: Option<usize>,
    /// After each run, make the log's writes again without the log (same
    /// size, same number in flight), through its own io_uring path and with
    /// blocking calls from threads, and print the ratios they reach: how
    /// much of a gap to the bar is the log's and how much the disk's. With
    /// `--sync-mode fdatasync` each of those writes is followed by its own
    /// `fdatasync`, where the log's one sync may cover several writes.
    #[arg(long)]
    same_writes: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One appender configuration's result.
#[derive(Debug, Clone, Copy)]
struct AppendRun {
    appends_per_s: f64,
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    records_per_sync: f64,
    /// Device KiB per write (a batch is one write, or two when split).
    kib_per_write: f64,
    /// Writes the log issued per second.
    writes_per_s: f64,
    /// The log's writes on the device at once, on average (the time its
    /// writes spent in flight over the run's duration).
    writes_in_flight: f64,
}

impl AppendRun {
    /// The log's writes, as the device saw them: (bytes, number in flight),
    /// each the nearest whole (blocks, writes) to the run's mean.
    fn write_shape(&self) -> (usize, usize) {
        let blocks = (self.kib_per_write / 4.0).round() as usize;
        (
            blocks.max(1) * 4096,
            (self.writes_in_flight.round() as usize).max(1),
        )
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let allowed = tidewal::engine::allowed_cpus();
    let cpu = match args.cpu {
        Some(cpu) if !allowed.contains(&cpu) => {
            anyhow::bail!("--cpu {cpu}: this process may run on cores {allowed:?} only")
        }
        Some(cpu) => cpu,
        None => allowed[0],
    };
    // As the node's executors poll: never in fdatasync mode (see
    // `engine::Options::effective_spin_us`).
    let spin_us = tidewal::engine::Options::new()
        .with_sync_mode(sync_mode(&args.sync_mode)?)
        .with_spin_before_park_us(args.spin_us)
        .effective_spin_us();
    let args = BenchArgs {
        cpu: Some(cpu),
        spin_us,
        ..args
    };
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".tidewal-bench"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // A second run over the same directory would delete this one's log and
    // ceiling files under it.
    let _lock = tidewal::io::lock_dir(&dir)
        .with_context(|| format!("locking {}", dir.display()))?
        .with_context(|| format!("another `tidewal bench wal` is using {}", dir.display()))?;
    let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
        .spin_before_park(Duration::from_micros(args.spin_us))
        .make()
        .map_err(|e| anyhow::anyhow!("starting the glommio executor (io_uring): {e}"))?;
    let result = executor.run(bench(args, dir.clone()));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn bench(args: BenchArgs, dir: PathBuf) -> anyhow::Result<()> {
    // Checked before anything runs: a typo must not cost the small runs.
    let large: Vec<(usize, usize)> = if args.small_only {
        Vec::new()
    } else {
        args.large
            .iter()
            .map(|s| parse_large(s))
            .collect::<anyhow::Result<_>>()?
    };
    let policy = if args.allow_buffered {
        DirectIo::AllowBuffered
    } else {
        DirectIo::Require
    };
    // The log runs with the chosen mode; the disk's ceiling is measured as
    // the issue defines it (a 4 KiB O_DIRECT write, then fdatasync), with
    // plain system calls (see `disk`).
    let storage = DmaStorage::open(&dir, policy)
        .await?
        .with_sync_mode(sync_mode(&args.sync_mode)?);
    let direct = storage.direct_io();
    let fill = match args.segment_fill.as_str() {
        "zeros" => SegmentFill::Zeros,
        "allocate" => SegmentFill::Allocate,
        other => anyhow::bail!("--segment-fill is zeros or allocate, not {other}"),
    };
    let seconds = Duration::from_secs_f64(args.seconds);
    println!(
        "tidewal bench wal: {} (O_DIRECT {}, log sync mode {:?}, executor on core {} spins {} us), {} runs of {:.1}s each, medians",
        dir.display(),
        if direct { "on" } else { "OFF" },
        storage.sync_mode(),
        args.cpu.unwrap_or_default(),
        args.spin_us,
        args.repeat,
        args.seconds
    );

    println!("\ndisk ceiling, same filesystem, same run, blocking system calls (as pg_test_fsync)");
    let sync_p50_us = median(
        &repeat(args.repeat, || async {
            disk::sync_latency(&dir, direct, seconds)
        })
        .await?,
    );
    println!(
        "  4 KiB O_DIRECT write + fdatasync   p50 {sync_p50_us:8.1} us  ({:.0}/s at one in flight)",
        1e6 / sync_p50_us
    );
    let seq_mb_s = median(&repeat(args.repeat, || async { disk::sequential(&dir, direct) }).await?);
    println!(
        "  sequential O_DIRECT 1 MiB writes   {seq_mb_s:8.0} MB/s (one in flight, fdatasync at end)"
    );
    let fio = fio_sequential(&dir);
    if let Some(fio) = fio {
        println!("  fio io_uring direct 1 MiB qd1      {fio:8.0} MB/s (cross-check)");
    }

    let same_header = if args.same_writes {
        println!(
            "\nuring, threads (--same-writes): after each run, the log's writes (same size, same
number in flight, made durable the same way) are made again without the log, by as many
tasks on this executor (io_uring, the log's own path) and by as many threads of blocking
calls; the columns give the ratio the records they would carry reach. uring is what
those writes reach on the log's own path with nothing else to do"
        );
        format!(" {:>7} {:>7}", "uring", "threads")
    } else {
        String::new()
    };

    let mut rows = Vec::new();
    println!(
        "\ndurable appends, {}-byte records (bar: 0.8 x min(N, records per batch cap) / sync p50)",
        args.record_bytes
    );
    println!(
        "  {:>9} {:>12} {:>9} {:>9} {:>9} {:>12} {:>12} {:>7}{}",
        "appenders",
        "appends/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "recs/sync",
        "bar",
        "ratio",
        same_header
    );
    let per_record = args.record_bytes + tidewal::format::RECORD_HEADER_BYTES;
    let small: &[usize] = if args.large_only {
        &[]
    } else {
        &args.concurrency
    };
    for &n in small {
        let mode = Mode {
            fill,
            n,
            record_bytes: args.record_bytes,
            steady: false,
        };
        // Each run is paired with a fresh ceiling measurement right before
        // it, so a ratio compares two moments of the same noisy disk.
        let effective = n.min(args.batch_bytes_max / per_record).max(1) as f64;
        let (mut runs, mut bars, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let mut same = SameRatios::default();
        for _ in 0..args.repeat.max(1) {
            let sync_us = disk::sync_latency(&dir, direct, seconds / 2)?;
            let r = append_run(&storage, &args, mode, seconds).await?;
            let bar = 0.8 * effective / (sync_us / 1e6);
            if args.same_writes {
                let per_write = r.appends_per_s / r.writes_per_s;
                same.measure(&storage, &dir, &r, per_write, bar, seconds / 2)
                    .await?;
            }
            bars.push(bar);
            ratios.push(r.appends_per_s / bar);
            runs.push(r);
        }
        let (r, bar, ratio) = (median_run(&runs), median(&bars), median(&ratios));
        println!(
            "  {n:>9} {:>12.0} {:>9.1} {:>9.1} {:>9.1} {:>12.1} {:>12.0} {:>7.2}{}",
            r.appends_per_s,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.records_per_sync,
            bar,
            ratio,
            same.cells()
        );
        let mut row = json!({"appenders": n, "record_bytes": args.record_bytes, "appends_per_s": r.appends_per_s,
            "p50_us": r.p50_us, "p99_us": r.p99_us, "p999_us": r.p999_us, "records_per_sync": r.records_per_sync,
            "bar_appends_per_s": bar, "ratio_to_bar": ratio, "writes_per_s": r.writes_per_s});
        same.add_to(&mut row, "bar");
        rows.push(row);
    }

    println!(
        "\nlarge records (bar: 0.7 x sequential ceiling); fresh: every segment is zero-filled"
    );
    println!(
        "first; steady: old segments are released as the log grows (a checkpointing consumer)"
    );
    println!("and recycled as new segments");
    println!(
        "  {:>8} {:>9} {:>7} {:>10} {:>10} {:>9} {:>9} {:>7}{}",
        "record",
        "appenders",
        "log",
        "MB/s",
        "ceiling",
        "p99 us",
        "KiB/write",
        "ratio",
        same_header
    );
    for &(record_bytes, n) in &large {
        for steady in [false, true] {
            let mode = Mode {
                fill,
                n,
                record_bytes,
                steady,
            };
            let (mut runs, mut ceilings, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            let mut same = SameRatios::default();
            for _ in 0..args.repeat.max(1) {
                let ceiling = disk::sequential(&dir, direct)?;
                let r = append_run(&storage, &args, mode, seconds).await?;
                if args.same_writes {
                    let per_write = r.mb_per_s / r.writes_per_s;
                    same.measure(&storage, &dir, &r, per_write, ceiling, seconds / 2)
                        .await?;
                }
                ceilings.push(ceiling);
                ratios.push(r.mb_per_s / ceiling);
                runs.push(r);
            }
            let (r, ceiling, ratio) = (median_run(&runs), median(&ceilings), median(&ratios));
            let log = if steady { "steady" } else { "fresh" };
            println!(
                "  {:>6}KiB {n:>9} {log:>7} {:>10.0} {ceiling:>10.0} {:>9.1} {:>9.0} {ratio:>7.2}{}",
                record_bytes / 1024,
                r.mb_per_s,
                r.p99_us,
                r.kib_per_write,
                same.cells()
            );
            let mut row = json!({"appenders": n, "record_bytes": record_bytes, "log": log,
                "mb_per_s": r.mb_per_s, "p99_us": r.p99_us, "ceiling_mb_per_s": ceiling,
                "kib_per_write": r.kib_per_write, "ratio_to_ceiling": ratio, "writes_per_s": r.writes_per_s});
            same.add_to(&mut row, "ceiling");
            rows.push(row);
        }
    }
    if let Some(path) = &args.json {
        let doc = json!({"direct_io": direct, "spin_us": args.spin_us, "cpu": args.cpu, "sync_mode": args.sync_mode, "sync_p50_us": sync_p50_us,
            "sequential_mb_per_s": seq_mb_s, "fio_sequential_mb_per_s": fio, "runs": rows});
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}

/// Parses `--sync-mode`.
fn sync_mode(s: &str) -> anyhow::Result<SyncMode> {
    match s {
        "dsync" => Ok(SyncMode::Dsync),
        "fdatasync" => Ok(SyncMode::Fdatasync),
        other => anyhow::bail!("--sync-mode is dsync or fdatasync, not {other}"),
    }
}

/// Parses `RECORD_BYTESxAPPENDERS`, e.g. `65536x16`.
fn parse_large(s: &str) -> anyhow::Result<(usize, usize)> {
    let (bytes, n) = s
        .split_once('x')
        .with_context(|| format!("--large {s:?}: expected RECORD_BYTESxAPPENDERS"))?;
    let number = |v: &str| {
        v.parse::<usize>()
            .with_context(|| format!("--large {s:?}: expected RECORD_BYTESxAPPENDERS"))
    };
    let (bytes, n) = (number(bytes)?, number(n)?);
    anyhow::ensure!(bytes > 0 && n > 0, "--large {s:?}: both must be positive");
    Ok((bytes, n))
}

async fn repeat<F, Fut>(n: usize, mut f: F) -> anyhow::Result<Vec<f64>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<f64>>,
{
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        out.push(f().await?);
    }
    Ok(out)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The median of each figure across runs.
fn median_run(runs: &[AppendRun]) -> AppendRun {
    let m = |f: fn(&AppendRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    AppendRun {
        appends_per_s: m(|r| r.appends_per_s),
        mb_per_s: m(|r| r.mb_per_s),
        p50_us: m(|r| r.p50_us),
        p99_us: m(|r| r.p99_us),
        p999_us: m(|r| r.p999_us),
        records_per_sync: m(|r| r.records_per_sync),
        kib_per_write: m(|r| r.kib_per_write),
        writes_per_s: m(|r| r.writes_per_s),
        writes_in_flight: m(|r| r.writes_in_flight),
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// The disk's own figures, measured the way `pg_test_fsync` and fio's
/// `sync` engine measure them: blocking system calls from one thread, no
/// runtime in between. (Measured through glommio instead, the latency carries
/// the executor's own cost of parking and being woken, 50-80 us on the
/// development VM, and the bar computed from it would be too low.)
mod disk {
    use std::alloc::{Layout, alloc_zeroed, dealloc};
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use anyhow::Context;

    /// A zeroed buffer aligned for O_DIRECT.
    struct Aligned {
        ptr: *mut u8,
        layout: Layout,
    }

    impl Aligned {
        fn new(len: usize, fill: u8) -> Self {
            let layout = Layout::from_size_align(len, 4096).expect("valid layout");
            // SAFETY: the layout has a non-zero size (callers pass >= 4 KiB).
            let ptr = unsafe { alloc_zeroed(layout) };
            assert!(!ptr.is_null(), "out of memory");
            let mut buf = Self { ptr, layout };
            buf.bytes_mut().fill(fill);
            buf
        }
        fn bytes(&self) -> &[u8] {
            // SAFETY: `ptr` holds `layout.size()` initialized bytes.
            unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
        }
        fn bytes_mut(&mut self) -> &mut [u8] {
            // SAFETY: as above, and `&mut self` makes the access unique.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
        }
    }

    impl Drop for Aligned {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.ptr, self.layout) }
        }
    }

    /// A scratch file of `len` bytes, written (not just allocated) and
    /// synced, as a WAL segment is before it holds records; removed on drop.
    struct Scratch {
        file: File,
        path: PathBuf,
    }

    impl Scratch {
        fn new(dir: &Path, name: &str, len: u64, direct: bool) -> anyhow::Result<Self> {
            let path = dir.join(name);
            let mut options = OpenOptions::new();
            options.read(true).write(true).create(true).truncate(true);
            if direct {
                options.custom_flags(libc::O_DIRECT);
            }
            let file = options
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let zeros = Aligned::new(1 << 20, 0);
            let mut pos = 0;
            while pos < len {
                file.write_all_at(zeros.bytes(), pos)?;
                pos += zeros.bytes().len() as u64;
            }
            file.sync_all()?;
            Ok(Self { file, path })
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Median latency (us) of a 4 KiB write followed by `fdatasync`, into a
    /// file whose blocks are already written.
    pub fn sync_latency(dir: &Path, direct: bool, duration: Duration) -> anyhow::Result<f64> {
        const FILE_BYTES: u64 = 16 << 20;
        let scratch = Scratch::new(dir, "ceiling-sync.dat", FILE_BYTES, direct)?;
        let block = Aligned::new(4096, 0x5a);
        let mut hist = super::histogram();
        let deadline = Instant::now() + duration;
        let mut pos = 0;
        while Instant::now() < deadline {
            let t = Instant::now();
            scratch.file.write_all_at(block.bytes(), pos)?;
            scratch.file.sync_data()?;
            hist.record(t.elapsed().as_nanos() as u64)?;
            pos = (pos + 4096) % FILE_BYTES;
        }
        Ok(hist.value_at_quantile(0.5) as f64 / 1000.0)
    }

    /// Writes per second the disk completes of `bytes`-byte writes,
    /// `in_flight` at once: as many threads (which inherit the caller's
    /// core), each overwriting its own region of a written file in order,
    /// with O_DSYNC writes or (`dsync` false) an `fdatasync` after each.
    pub fn same_writes(
        dir: &Path,
        direct: bool,
        dsync: bool,
        bytes: usize,
        in_flight: usize,
        duration: Duration,
    ) -> anyhow::Result<f64> {
        let region = super::same_writes_region(bytes);
        let scratch = Scratch::new(dir, "ceiling-same.dat", region * in_flight as u64, direct)?;
        let mut options = OpenOptions::new();
        options.write(true);
        let mut flags = if dsync { libc::O_DSYNC } else { 0 };
        if direct {
            flags |= libc::O_DIRECT;
        }
        options.custom_flags(flags);
        let start = std::sync::Barrier::new(in_flight);
        let rates = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..in_flight as u64)
                .map(|i| {
                    let (options, start, path) = (&options, &start, &scratch.path);
                    scope.spawn(move || -> anyhow::Result<f64> {
                        let file = options.open(path)?;
                        let buf = Aligned::new(bytes, 0x5a);
                        start.wait();
                        let t = Instant::now();
                        let deadline = t + duration;
                        let (mut pos, mut count) = (0, 0);
                        while Instant::now() < deadline {
                            file.write_all_at(buf.bytes(), i * region + pos)?;
                            if !dsync {
                                file.sync_data()?;
                            }
                            pos = (pos + bytes as u64) % region;
                            count += 1;
                        }
                        Ok(count as f64 / t.elapsed().as_secs_f64())
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("a writer thread panicked"))
                .collect::<anyhow::Result<Vec<f64>>>()
        })?;
        Ok(rates.iter().sum())
    }

    /// MB/s of sequential 1 MiB overwrites of a written file, one at a time,
    /// with the closing `fdatasync` counted.
    pub fn sequential(dir: &Path, direct: bool) -> anyhow::Result<f64> {
        const FILE_BYTES: u64 = 256 << 20;
        let scratch = Scratch::new(dir, "ceiling-seq.dat", FILE_BYTES, direct)?;
        let chunk = Aligned::new(1 << 20, 0x5a);
        let t = Instant::now();
        let mut pos = 0;
        while pos < FILE_BYTES {
            scratch.file.write_all_at(chunk.bytes(), pos)?;
            pos += chunk.bytes().len() as u64;
        }
        scratch.file.sync_data()?;
        Ok(FILE_BYTES as f64 / 1e6 / t.elapsed().as_secs_f64())
    }
}

/// The sequential O_DIRECT write ceiling of the filesystem holding `dir`,
/// MB/s (for benchmarks that compare against it outside this one).
pub fn sequential_ceiling(dir: &Path) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir)?;
    disk::sequential(dir, true)
}

/// fio's figure for the same pattern, where fio is installed: overwriting a
/// file whose blocks are written (`--overwrite=1`), as the ceiling and a WAL
/// segment do. Without it fio writes into freshly allocated extents and, on
/// ext4 on the development VM, reports about 60% of the figure (1,877-2,097
/// against 2,886-3,050 MB/s in alternating runs).
fn fio_sequential(dir: &Path) -> Option<f64> {
    let file = dir.join("fio.dat");
    let out = std::process::Command::new("fio")
        .args([
            "--name=seq",
            "--size=256M",
            "--bs=1M",
            "--rw=write",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=1",
            "--end_fsync=1",
            "--overwrite=1",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&file);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let kib_s = doc["jobs"][0]["write"]["bw"].as_f64()?;
    Some(kib_s * 1024.0 / 1e6)
}

/// A row's `--same-writes` figures: after each run, that run's writes
/// made again without the log, as ratios to the run's bar.
#[derive(Default)]
struct SameRatios {
    /// Each run's write shape and writes/s, for the JSON.
    runs: Vec<serde_json::Value>,
    /// Through the log's own I/O path (this executor, io_uring).
    uring: Vec<f64>,
    /// With blocking system calls from as many threads.
    threads: Vec<f64>,
}

impl SameRatios {
    /// Makes writes of the shape `run`'s log made, both ways, and records
    /// what they would carry (`per_write`: appends, or record MB, per
    /// write of the log) over `bar`.
    async fn measure(
        &mut self,
        storage: &DmaStorage,
        dir: &Path,
        run: &AppendRun,
        per_write: f64,
        bar: f64,
        duration: Duration,
    ) -> anyhow::Result<()> {
        let (bytes, in_flight) = run.write_shape();
        let uring = uring_same_writes(storage, bytes, in_flight, duration).await?;
        let dsync = storage.sync_mode() == SyncMode::Dsync;
        let threads =
            disk::same_writes(dir, storage.direct_io(), dsync, bytes, in_flight, duration)?;
        self.uring.push(uring * per_write / bar);
        self.threads.push(threads * per_write / bar);
        self.runs
            .push(json!({"write_bytes": bytes, "in_flight": in_flight,
            "uring_writes_per_s": uring, "threads_writes_per_s": threads}));
        Ok(())
    }

    /// The two table cells (medians), or nothing when not measured.
    fn cells(&self) -> String {
        if self.uring.is_empty() {
            return String::new();
        }
        format!(
            " {:>7.2} {:>7.2}",
            median(&self.uring),
            median(&self.threads)
        )
    }

    /// Adds the medians and each run's figures to a row's JSON; `of` names
    /// what the ratios are to ("bar" or "ceiling").
    fn add_to(&self, row: &mut serde_json::Value, of: &str) {
        if self.uring.is_empty() {
            return;
        }
        row[format!("same_writes_uring_ratio_to_{of}")] = json!(median(&self.uring));
        row[format!("same_writes_threads_ratio_to_{of}")] = json!(median(&self.threads));
        row["same_writes"] = json!(self.runs);
    }
}

/// Writes per second of `bytes`-byte writes, `in_flight` at once, made
/// durable as the log's are (`StorageFile::write_shared`, then `sync`, which
/// with O_DSYNC writes has nothing left to do) by as many tasks on this
/// executor, each overwriting its own region of a written file in order:
/// the log's writes with no records to stage, encode or acknowledge.
async fn uring_same_writes(
    storage: &DmaStorage,
    bytes: usize,
    in_flight: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    const NAME: &str = "ceiling-same-uring.dat";
    let region = same_writes_region(bytes);
    let file = Rc::new(storage.create(NAME).await?);
    // Written, as a segment is before it holds records.
    let len = region * in_flight as u64;
    tidewal::io::zero_fill(&*file, len, |_| tidewal::io::ZeroPace::Urgent).await?;
    let mut data = tidewal::io::AlignedBuf::with_capacity(bytes);
    data.extend_from_slice(&vec![0x5a; bytes]);
    let (data, _) = data.share();
    let tasks: Vec<_> = (0..in_flight as u64)
        .map(|i| {
            let (file, data) = (file.clone(), data.clone());
            glommio::spawn_local(async move {
                let t = Instant::now();
                let (mut pos, mut count) = (0, 0u64);
                while t.elapsed() < duration {
                    file.write_shared(i * region + pos, data.clone()).await?;
                    file.sync().await?;
                    pos = (pos + bytes as u64) % region;
                    count += 1;
                }
                anyhow::Ok(count as f64 / t.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut rate = 0.0;
    for task in tasks {
        rate += task.await?;
    }
    drop(file);
    storage.remove(NAME).await?;
    Ok(rate)
}

/// Bytes of file each writer of `--same-writes` overwrites in turn: 32 MiB,
/// or eight writes if more, in whole writes.
fn same_writes_region(bytes: usize) -> u64 {
    (32u64 << 20)
        .max(8 * bytes as u64)
        .next_multiple_of(bytes as u64)
}

/// Microseconds a log's writes have spent in flight in total, from its
/// write-duration histogram.
fn micros_in_flight(writes: &hdrhistogram::Histogram<u64>) -> f64 {
    writes.mean() * writes.len() as f64
}

/// What one append run does.
#[derive(Clone, Copy)]
struct Mode {
    fill: SegmentFill,
    /// Concurrent appenders.
    n: usize,
    record_bytes: usize,
    /// Release segments as they fill, so they are recycled.
    steady: bool,
}

/// `mode.n` appenders against a new log for `duration`.
async fn append_run(
    storage: &DmaStorage,
    args: &BenchArgs,
    mode: Mode,
    duration: Duration,
) -> anyhow::Result<AppendRun> {
    let Mode {
        fill,
        n,
        record_bytes,
        steady,
    } = mode;
    for name in storage.list().await? {
        if name.ends_with(".wal") || name.contains(".spare") {
            storage.remove(&name).await?;
        }
    }
    let mut options = WalOptions::new(BENCH_LOG);
    options.batch_bytes_max = args.batch_bytes_max;
    options.staged_bytes_max = args.batch_bytes_max.max(16 << 20);
    options.segment_fill = fill;
    let wal = Rc::new(Wal::open(storage.clone(), options).await?);
    let body = vec![0x42u8; record_bytes];
    wal.append(RecordKind::Data, &body).await?; // the first segment exists
    let before = wal.stats();
    let latency = Rc::new(RefCell::new(histogram()));
    let stop = Rc::new(std::cell::Cell::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (wal, latency, body, stop) =
                (wal.clone(), latency.clone(), body.clone(), stop.clone());
            glommio::spawn_local(async move {
                // One histogram for all: one per appender (213 KB each at
                // this precision) made every record a cache miss, 8% of
                // the executor's samples at 256 appenders.
                // One clock read per append: an append's end is the next
                // one's start (recording the figure between them takes
                // nanoseconds, and is counted in the next latency).
                let mut count = 0u64;
                let mut t = Instant::now();
                while !stop.get() {
                    wal.append(RecordKind::Data, &body).await?;
                    let now = Instant::now();
                    latency.borrow_mut().record((now - t).as_nanos() as u64)?;
                    t = now;
                    count += 1;
                }
                anyhow::Ok(count)
            })
        })
        .collect();
    let checkpointer = steady.then(|| {
        let (wal, stop) = (wal.clone(), stop.clone());
        glommio::spawn_local(async move {
            while !stop.get() {
                glommio::timer::sleep(Duration::from_millis(5)).await;
                wal.release_below(wal.durable_lsn()).await?;
            }
            anyhow::Ok(())
        })
    });
    glommio::timer::sleep(duration).await;
    stop.set(true);
    if let Some(task) = checkpointer {
        task.await?;
    }
    let mut total = 0;
    for task in tasks {
        total += task.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let stats = wal.stats();
    let wal = Rc::try_unwrap(wal).map_err(|_| anyhow::anyhow!("log still shared"))?;
    wal.close().await?;
    let hist = latency.borrow();
    let syncs = (stats.syncs - before.syncs).max(1);
    Ok(AppendRun {
        appends_per_s: total as f64 / elapsed,
        // The records appended, not the padding the log added.
        mb_per_s: (total * (record_bytes + tidewal::format::RECORD_HEADER_BYTES) as u64) as f64
            / 1e6
            / elapsed,
        p50_us: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
        p999_us: hist.value_at_quantile(0.999) as f64 / 1000.0,
        records_per_sync: (stats.records - before.records) as f64 / syncs as f64,
        kib_per_write: (stats.device_bytes - before.device_bytes) as f64
            / 1024.0
            / (stats.writes - before.writes).max(1) as f64,
        writes_per_s: (stats.writes - before.writes) as f64 / elapsed,
        writes_in_flight: (micros_in_flight(&stats.write_micros)
            - micros_in_flight(&before.write_micros))
            / 1e6
            / elapsed,
    })
}
