//! An in-memory filesystem that keeps what was synced apart from what was
//! only written, so a test can cut the power and see what a real disk could
//! have kept.
//!
//! Model: each file has the bytes a reader sees now and the bytes that are
//! durable (as of its last `sync`), plus the list of writes since. The
//! directory has the names it holds now and the names that are durable (as of
//! the last `sync_dir`). A power cut keeps the durable state and, depending on
//! the [`PowerCut`], none, some, or torn prefixes of the unsynced writes.
//! Every operation yields to the executor once, so concurrent tasks interleave
//! with "I/O in flight" as they would on a device.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use super::{BLOCK_BYTES, IoError, Storage, StorageFile};

/// Sector size for torn writes: a write may persist a prefix of whole sectors.
const SECTOR_BYTES: usize = 512;

/// The operations a fault rule can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Open,
    Create,
    List,
    Remove,
    Rename,
    SyncDir,
    Write,
    Read,
    Sync,
    Allocate,
}

/// What survives a power cut of the unsynced writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerCut {
    /// Every write since the file's last sync is lost.
    DropUnsynced,
    /// Every unsynced write but the last reaches the disk; the last keeps only
    /// its first `sectors` 512-byte sectors.
    TearLast { sectors: usize },
    /// Each unsynced write is, by a seeded choice, lost, kept, or torn at a
    /// sector boundary.
    Random { seed: u64 },
}

#[derive(Debug, Default)]
struct MemFile {
    data: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<(u64, Vec<u8>)>,
}

fn apply(target: &mut Vec<u8>, pos: u64, bytes: &[u8]) {
    let end = pos as usize + bytes.len();
    if target.len() < end {
        target.resize(end, 0);
    }
    target[pos as usize..end].copy_from_slice(bytes);
}

#[derive(Debug)]
struct Rule {
    op: FaultOp,
    skip: u64,
    errno: i32,
}

#[derive(Debug, Default)]
struct FaultFs {
    names: BTreeMap<String, Rc<RefCell<MemFile>>>,
    durable_names: BTreeMap<String, Rc<RefCell<MemFile>>>,
    rules: Vec<Rule>,
    crash_after_ops: Option<u64>,
    dead: bool,
}

impl FaultFs {
    /// Applies fault rules and the crash countdown to one operation.
    fn admit(&mut self, op: FaultOp, name: &str) -> Result<(), IoError> {
        let fail = |errno| {
            Err(IoError::new(
                op_name(op),
                name,
                std::io::Error::from_raw_os_error(errno),
            ))
        };
        if self.dead {
            return fail(libc::EIO);
        }
        if let Some(left) = self.crash_after_ops.as_mut() {
            if *left == 0 {
                self.dead = true;
                return fail(libc::EIO);
            }
            *left -= 1;
        }
        if let Some(i) = self.rules.iter().position(|r| r.op == op) {
            if self.rules[i].skip == 0 {
                let rule = self.rules.remove(i);
                return fail(rule.errno);
            }
            self.rules[i].skip -= 1;
        }
        Ok(())
    }
}

fn op_name(op: FaultOp) -> &'static str {
    match op {
        FaultOp::Open => "open",
        FaultOp::Create => "create",
        FaultOp::List => "list",
        FaultOp::Remove => "remove",
        FaultOp::Rename => "rename",
        FaultOp::SyncDir => "sync_dir",
        FaultOp::Write => "write",
        FaultOp::Read => "read",
        FaultOp::Sync => "sync",
        FaultOp::Allocate => "allocate",
    }
}

/// The fault-injecting backend. Clones share one filesystem.
#[derive(Debug, Clone, Default)]
pub struct FaultStorage {
    fs: Rc<RefCell<FaultFs>>,
}

/// A file of [`FaultStorage`].
#[derive(Debug)]
pub struct FaultFile {
    fs: Rc<RefCell<FaultFs>>,
    file: Rc<RefCell<MemFile>>,
    name: String,
}

impl FaultStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `skip`-th next `op` (0 = the very next) fails with `errno`
    /// (`libc::EIO`, `libc::ENOSPC`, ...). One failure per call.
    pub fn fail(&self, op: FaultOp, skip: u64, errno: i32) {
        self.fs.borrow_mut().rules.push(Rule { op, skip, errno });
    }

    /// After `ops` more operations the machine dies: that operation and
    /// every later one fail with EIO and change nothing, until [`Self::power_cut`].
    pub fn crash_after(&self, ops: u64) {
        self.fs.borrow_mut().crash_after_ops = Some(ops);
    }

    /// Ends a [`Self::crash_after`] without a power cut: the process died,
    /// the machine did not, so every write made so far is still there (in
    /// the page cache or the device cache), synced or not.
    pub fn process_restart(&self) {
        let mut fs = self.fs.borrow_mut();
        fs.rules.clear();
        fs.crash_after_ops = None;
        fs.dead = false;
    }

    /// Whether a [`Self::crash_after`] countdown has run out.
    pub fn is_dead(&self) -> bool {
        self.fs.borrow().dead
    }

    /// Cuts the power: only durable names and bytes survive, plus whatever
    /// `mode` lets through of the unsynced writes. Clears faults; the
    /// filesystem is usable again afterwards, like a rebooted machine.
    pub fn power_cut(&self, mode: PowerCut) {
        let mut fs = self.fs.borrow_mut();
        let mut rng = Rng(match mode {
            PowerCut::Random { seed } => seed | 1,
            _ => 1,
        });
        fs.names = fs.durable_names.clone();
        for file in fs.names.values() {
            let mut file = file.borrow_mut();
            let mut kept = std::mem::take(&mut file.durable);
            let unsynced = std::mem::take(&mut file.unsynced);
            let last = unsynced.len().saturating_sub(1);
            for (i, (pos, bytes)) in unsynced.iter().enumerate() {
                let sectors = bytes.len().div_ceil(SECTOR_BYTES);
                let keep = match mode {
                    PowerCut::DropUnsynced => 0,
                    PowerCut::TearLast { sectors: torn } if i == last => torn.min(sectors),
                    PowerCut::TearLast { .. } => sectors,
                    PowerCut::Random { .. } => match rng.next() % 3 {
                        0 => 0,
                        1 => sectors,
                        _ => (rng.next() as usize) % sectors.max(1),
                    },
                };
                let n = (keep * SECTOR_BYTES).min(bytes.len());
                apply(&mut kept, *pos, &bytes[..n]);
            }
            file.data = kept.clone();
            file.durable = kept;
        }
        fs.rules.clear();
        fs.crash_after_ops = None;
        fs.dead = false;
    }

    /// Flips one bit of a file, in what readers see and in the durable copy.
    pub fn flip_bit(&self, name: &str, offset: usize, bit: u8) {
        let fs = self.fs.borrow();
        let mut file = fs.names[name].borrow_mut();
        file.data[offset] ^= 1 << bit;
        if offset < file.durable.len() {
            file.durable[offset] ^= 1 << bit;
        }
    }

    /// Overwrites bytes of a file (creating it if needed), durably, as a
    /// stray write or a bad sector would.
    pub fn poke(&self, name: &str, offset: usize, bytes: &[u8]) {
        let mut fs = self.fs.borrow_mut();
        let file = fs.names.entry(name.to_string()).or_default().clone();
        fs.durable_names.insert(name.to_string(), file.clone());
        let mut file = file.borrow_mut();
        apply(&mut file.data, offset as u64, bytes);
        apply(&mut file.durable, offset as u64, bytes);
    }

    /// Removes a file at once and durably.
    pub fn delete(&self, name: &str) {
        let mut fs = self.fs.borrow_mut();
        fs.names.remove(name);
        fs.durable_names.remove(name);
    }

    /// The names the directory holds now.
    pub fn file_names(&self) -> Vec<String> {
        self.fs.borrow().names.keys().cloned().collect()
    }

    /// What a reader would see of a file now, if it exists.
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let fs = self.fs.borrow();
        fs.names.get(name).map(|f| f.borrow().data.clone())
    }

    /// An independent copy of the current state, durable as it stands now
    /// (as if every file and the directory had just been synced).
    pub fn snapshot(&self) -> FaultStorage {
        let fs = self.fs.borrow();
        let names: BTreeMap<_, _> = fs
            .names
            .iter()
            .map(|(name, file)| {
                let data = file.borrow().data.clone();
                let copy = MemFile {
                    durable: data.clone(),
                    data,
                    unsynced: Vec::new(),
                };
                (name.clone(), Rc::new(RefCell::new(copy)))
            })
            .collect();
        let copy = FaultFs {
            durable_names: names.clone(),
            names,
            ..FaultFs::default()
        };
        FaultStorage {
            fs: Rc::new(RefCell::new(copy)),
        }
    }

    fn admit(&self, op: FaultOp, name: &str) -> Result<(), IoError> {
        self.fs.borrow_mut().admit(op, name)
    }

    fn handle(&self, name: &str, file: Rc<RefCell<MemFile>>) -> FaultFile {
        FaultFile {
            fs: self.fs.clone(),
            file,
            name: name.to_string(),
        }
    }
}

/// xorshift64: a seeded choice, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn not_found(op: FaultOp, name: &str) -> IoError {
    IoError::new(op_name(op), name, std::io::ErrorKind::NotFound.into())
}

impl Storage for FaultStorage {
    type File = FaultFile;

    async fn open(&self, name: &str) -> Result<FaultFile, IoError> {
        futures_lite::future::yield_now().await;
        self.admit(FaultOp::Open, name)?;
        let file = self.fs.borrow().names.get(name).cloned();
        let file = file.ok_or_else(|| not_found(FaultOp::Open, name))?;
        Ok(self.handle(name, file))
    }

    async fn create(&self, name: &str) -> Result<FaultFile, IoError> {
        futures_lite::future::yield_now().await;
        self.admit(FaultOp::Create, name)?;
        let file = Rc::new(RefCell::new(MemFile::default()));
        self.fs
            .borrow_mut()
            .names
            .insert(name.to_string(), file.clone());
        Ok(self.handle(name, file))
    }

    async fn list(&self) -> Result<Vec<String>, IoError> {
        self.admit(FaultOp::List, "")?;
        Ok(self.fs.borrow().names.keys().cloned().collect())
    }

    async fn remove(&self, name: &str) -> Result<(), IoError> {
        futures_lite::future::yield_now().await;
        self.admit(FaultOp::Remove, name)?;
        let removed = self.fs.borrow_mut().names.remove(name);
        removed
            .map(drop)
            .ok_or_else(|| not_found(FaultOp::Remove, name))
    }

    async fn rename(&self, from: &str, to: &str) -> Result<(), IoError> {
        futures_lite::future::yield_now().await;
        self.admit(FaultOp::Rename, from)?;
        let mut fs = self.fs.borrow_mut();
        let file = fs
            .names
            .remove(from)
            .ok_or_else(|| not_found(FaultOp::Rename, from))?;
        fs.names.insert(to.to_string(), file);
        Ok(())
    }

    async fn sync_dir(&self) -> Result<(), IoError> {
        futures_lite::future::yield_now().await;
        self.admit(FaultOp::SyncDir, "")?;
        let mut fs = self.fs.borrow_mut();
        fs.durable_names = fs.names.clone();
        Ok(())
    }
}

impl StorageFile for FaultFile {
    async fn write_at(&self, pos: u64, parts: &[&[u8]]) -> Result<(), IoError> {
        assert_eq!(pos % BLOCK_BYTES, 0, "unaligned write at {pos}");
        let mut bytes: Vec<u8> = parts.concat();
        bytes.resize(bytes.len().next_multiple_of(BLOCK_BYTES as usize), 0);
        futures_lite::future::yield_now().await;
        self.fs.borrow_mut().admit(FaultOp::Write, &self.name)?;
        let mut file = self.file.borrow_mut();
        apply(&mut file.data, pos, &bytes);
        file.unsynced.push((pos, bytes));
        Ok(())
    }

    async fn read_at(&self, pos: u64, len: usize) -> Result<Vec<u8>, IoError> {
        self.fs.borrow_mut().admit(FaultOp::Read, &self.name)?;
        let file = self.file.borrow();
        let start = (pos as usize).min(file.data.len());
        let end = (start + len).min(file.data.len());
        Ok(file.data[start..end].to_vec())
    }

    async fn sync(&self) -> Result<(), IoError> {
        futures_lite::future::yield_now().await;
        self.fs.borrow_mut().admit(FaultOp::Sync, &self.name)?;
        let mut file = self.file.borrow_mut();
        let unsynced = std::mem::take(&mut file.unsynced);
        for (pos, bytes) in unsynced {
            apply(&mut file.durable, pos, &bytes);
        }
        Ok(())
    }

    async fn file_size(&self) -> Result<u64, IoError> {
        Ok(self.file.borrow().data.len() as u64)
    }

    async fn allocate(&self, len: u64) -> Result<(), IoError> {
        self.fs.borrow_mut().admit(FaultOp::Allocate, &self.name)?;
        let mut file = self.file.borrow_mut();
        if (file.data.len() as u64) < len {
            file.data.resize(len as usize, 0);
            file.durable.resize(len as usize, 0);
        }
        Ok(())
    }
}
