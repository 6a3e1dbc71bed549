//! Helpers shared by the integration tests.
#![allow(dead_code)]

/// Defines each listed async case `fn(B: Backend)` as two tests: on the
/// fault backend and on the real disk. The disk directory outlives the
/// executor, so a spare file still being prepared when a case returns
/// never sees it vanish.
#[allow(unused_macros)]
macro_rules! both_backends {
    ($($case:ident),*) => {
        mod on_fault_backend {
            use super::*;
            $(#[test] fn $case() { run(|| super::$case(Mem::default())); })*
        }
        mod on_disk {
            use super::*;
            $(#[test] fn $case() {
                let b = Disk::new();
                let keep = b.clone();
                run(move || super::$case(b));
                drop(keep);
            })*
        }
    };
}

pub mod node;
pub mod proxy;

use std::future::Future;
use std::path::PathBuf;

use tidewal::format::LogId;
use tidewal::wal::WalOptions;

pub const LOG: LogId = LogId {
    cluster_id: [0x5a; 16],
    shard: 0,
};

/// Runs `f` on a fresh glommio executor on this thread.
pub fn run<T: 'static, F: Future<Output = T> + 'static>(f: impl FnOnce() -> F) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor (io_uring)")
        .run(f())
}

/// Small segments so that tests cross segment boundaries.
pub fn small_options() -> WalOptions {
    let mut options = WalOptions::new(LOG);
    options.segment_bytes = 64 << 10;
    options.batch_bytes_max = 8 << 10;
    options.staged_bytes_max = 32 << 10;
    options
}

/// A directory on the real disk (not tmpfs: O_DIRECT must be in effect).
pub fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir under target/")
}

pub fn path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().to_path_buf()
}

/// The body of the `seq`-th record of appender `who`: recognisable, so a
/// recovered record can be checked to be one that was really written.
pub fn body(who: usize, seq: usize, len: usize) -> Vec<u8> {
    let mut b = format!("{who}:{seq}:").into_bytes();
    while b.len() < len {
        b.push(b'a' + ((who + seq + b.len()) % 26) as u8);
    }
    b
}

/// Parses a body made by [`body`] back into `(who, seq)` and checks its fill.
pub fn parse_body(b: &[u8]) -> Option<(usize, usize)> {
    let s = std::str::from_utf8(b).ok()?;
    let mut parts = s.splitn(3, ':');
    let who: usize = parts.next()?.parse().ok()?;
    let seq: usize = parts.next()?.parse().ok()?;
    (body(who, seq, b.len()) == b).then_some((who, seq))
}

/// SplitMix64: seeded choices for randomized tests, printed on failure.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// One of the power-cut modes, chosen evenly: drop, tear the last
    /// write, or drop/keep/tear each unsynced write at random.
    pub fn power_cut(&mut self) -> tidewal::io::PowerCut {
        use tidewal::io::PowerCut;
        match self.below(3) {
            0 => PowerCut::DropUnsynced,
            1 => PowerCut::TearLast {
                sectors: self.below(20) as usize,
            },
            _ => PowerCut::Random { seed: self.next() },
        }
    }
}

/// Runs `tidewal wal inspect DIR` with `extra` arguments.
pub fn wal_inspect(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tidewal"))
        .args(["wal", "inspect"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("run tidewal wal inspect")
}

/// How many randomized runs to do: `TIDEWAL_<NAME>` or the default.
pub fn runs(name: &str, default: u64) -> u64 {
    std::env::var(format!("TIDEWAL_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads every durable record from the oldest segment on.
pub async fn read_all_records<S: tidewal::Storage + 'static>(
    wal: &tidewal::Wal<S>,
) -> Vec<tidewal::wal::OwnedRecord> {
    let mut pos = wal.first_position();
    let mut out = Vec::new();
    loop {
        let batch = wal.read(pos, 16 << 10).await.expect("read");
        if batch.records.is_empty() {
            return out;
        }
        pos = batch.next;
        out.extend(batch.records);
    }
}

/// The records appended with `RecordKind::Data`, in order: what
/// [`read_all_records`] returns without the `Noop` records the log adds to
/// pad a batch to a block boundary.
pub async fn read_data_records<S: tidewal::Storage + 'static>(
    wal: &tidewal::Wal<S>,
) -> Vec<tidewal::wal::OwnedRecord> {
    let mut records = read_all_records(wal).await;
    records.retain(|r| r.kind == tidewal::format::RecordKind::Data);
    records
}

/// A storage backend plus the means to tamper with its files behind the
/// log's back, so a test can run on the fault backend and on the real disk.
#[allow(async_fn_in_trait)]
pub trait Backend: Clone + 'static {
    type S: tidewal::Storage + Clone + 'static;
    async fn storage(&self) -> Self::S;
    /// A second storage, independent of the first (another node's disk).
    async fn other_storage(&self) -> Self::S;
    fn read(&self, name: &str) -> Vec<u8>;
    fn poke(&self, name: &str, offset: usize, bytes: &[u8]);
    fn delete(&self, name: &str);
    fn names(&self) -> Vec<String>;
    fn flip(&self, name: &str, offset: usize, bit: u8) {
        let byte = self.read(name)[offset] ^ (1 << bit);
        self.poke(name, offset, &[byte]);
    }
    /// Segment files, oldest first.
    fn segments(&self) -> Vec<String> {
        let mut v: Vec<_> = self
            .names()
            .into_iter()
            .filter(|n| n.ends_with(".wal"))
            .collect();
        v.sort();
        v
    }
}

#[derive(Clone, Default)]
pub struct Mem(pub tidewal::FaultStorage);

impl Backend for Mem {
    type S = tidewal::FaultStorage;
    async fn storage(&self) -> Self::S {
        self.0.clone()
    }
    async fn other_storage(&self) -> Self::S {
        tidewal::FaultStorage::new()
    }
    fn read(&self, name: &str) -> Vec<u8> {
        self.0.contents(name).expect("file exists")
    }
    fn poke(&self, name: &str, offset: usize, bytes: &[u8]) {
        self.0.poke(name, offset, bytes)
    }
    fn delete(&self, name: &str) {
        self.0.delete(name)
    }
    fn names(&self) -> Vec<String> {
        self.0.file_names()
    }
}

#[derive(Clone)]
pub struct Disk(pub std::rc::Rc<tempfile::TempDir>);

impl Disk {
    pub fn new() -> Self {
        Disk(std::rc::Rc::new(disk_dir()))
    }
}

impl Backend for Disk {
    type S = tidewal::DmaStorage;
    async fn storage(&self) -> Self::S {
        tidewal::DmaStorage::open(self.0.path(), tidewal::DirectIo::Require)
            .await
            .expect("O_DIRECT storage on the target dir")
    }
    async fn other_storage(&self) -> Self::S {
        tidewal::DmaStorage::open(&self.0.path().join("other"), tidewal::DirectIo::Require)
            .await
            .expect("O_DIRECT storage on the target dir")
    }
    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.0.path().join(name)).expect("file exists")
    }
    fn poke(&self, name: &str, offset: usize, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.0.path().join(name))
            .unwrap();
        f.write_all_at(bytes, offset as u64).unwrap();
        f.sync_all().unwrap();
    }
    fn delete(&self, name: &str) {
        std::fs::remove_file(self.0.path().join(name)).unwrap();
    }
    fn names(&self) -> Vec<String> {
        std::fs::read_dir(self.0.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }
}

/// Paths of the files of every shard directory's quarantine under a
/// node's data dir.
pub fn quarantined(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for shard in std::fs::read_dir(dir).unwrap().flatten() {
        if !shard.file_name().to_string_lossy().starts_with("shard-") {
            continue;
        }
        for q in std::fs::read_dir(shard.path()).unwrap().flatten() {
            if q.file_name().to_string_lossy().starts_with("quarantine-") {
                for f in std::fs::read_dir(q.path()).unwrap().flatten() {
                    found.push(f.path().display().to_string());
                }
            }
        }
    }
    found
}
