//! The set of segment files a log holds, their recovery, and spare files.
//!
//! A spare is a segment-sized file written full of zeros and synced ahead of
//! need (`{n}.spare.tmp`, renamed `{n}.spare` once filled), so rotation costs
//! a rename and a directory sync, not 64 MiB of writes on the commit path.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::format::{Expect, parse_segment_file_name, segment_file_name};
use crate::io::{BLOCK_BYTES, Storage, StorageFile, ZeroPace, read_all, zero_fill};

use super::recovery::{Case, Refusal, decide};
use super::scan::{SegmentScan, offset_of, scan_segment};
use super::{RecoveryReport, SegmentFill, WalError, WalOptions};

/// One segment file held by the log.
pub(super) struct SegmentMeta<F> {
    pub base_lsn: u64,
    /// Chain seed of the first record.
    pub base_chain: u32,
    /// LSN after the last durable record in it.
    pub end_lsn: u64,
    pub file: Rc<F>,
}

/// Where a read finds its segment.
pub(super) struct Located<F> {
    pub base_lsn: u64,
    pub end_lsn: u64,
    pub file: Rc<F>,
    /// Base LSN and chain seed of the next segment, if there is one.
    pub next: Option<(u64, u32)>,
}

/// The state the writer resumes from: the last segment and its partial block.
pub(super) struct Tail<F> {
    pub base_lsn: u64,
    pub file: Rc<F>,
    /// File offset where the next record goes.
    pub end_offset: u64,
    /// The bytes of the block that holds `end_offset`, up to it.
    pub block: Vec<u8>,
}

pub(super) struct Segments<S: Storage> {
    pub storage: Rc<S>,
    metas: RefCell<BTreeMap<u64, SegmentMeta<S::File>>>,
    /// Released segment files renamed as spares, oldest first.
    recycled: RefCell<std::collections::VecDeque<String>>,
    /// Where the log starts when it holds no segment (recovery found none,
    /// or discarded the only one): the recovered end.
    origin: Expect,
}

type Recovered<S> = (
    Segments<S>,
    RecoveryReport,
    Expect,
    Option<Tail<<S as Storage>::File>>,
);

impl<S: Storage> Segments<S> {
    /// Scans every segment, applies the recovery decision table, and repairs
    /// what it allows (zeroes a torn tail, discards a torn rotation).
    pub async fn recover(storage: Rc<S>, options: &WalOptions) -> Result<Recovered<S>, WalError> {
        remove_stale_temporaries(&*storage).await?;
        let mut bases: Vec<u64> = storage
            .list()
            .await?
            .iter()
            .filter_map(|n| parse_segment_file_name(n))
            .collect();
        bases.sort_unstable();
        let mut scans: Vec<SegmentScan> = Vec::new();
        let mut epochs: Vec<(u64, u64)> = Vec::new();
        let mut files = Vec::new();
        let mut records = 0;
        for base in bases {
            let name = segment_file_name(base);
            let file = storage.open(&name).await?;
            let size = file.file_size().await?;
            if size > SEGMENT_BYTES_MAX || base > u64::MAX - SEGMENT_BYTES_MAX {
                let why = format!("{size} bytes at base {base}: over the limits of a segment");
                return Err(WalError::Corrupt {
                    refusal: Refusal {
                        case: Case::CorruptHeader,
                        segment: name,
                        offset: 0,
                        why,
                    },
                });
            }
            let bytes = read_all(&file).await?;
            let floor = scans.last().map_or(0, |s| s.end.epoch);
            let scan = scan_segment(&bytes, options.log, base, floor, |r| {
                if epochs.last().is_none_or(|(e, _)| r.epoch() > *e) {
                    epochs.push((r.epoch(), r.lsn()));
                }
            });
            records += scan.records;
            scans.push(scan);
            files.push(Rc::new(file));
        }
        // Refetchable only past this log's own epochs: the damage follows
        // the last segment's last good record.
        let refetchable = options.tail_refetchable
            && scans
                .last()
                .is_none_or(|s| s.end.epoch > options.own_epoch_max);
        let decision =
            decide(&scans, refetchable).map_err(|refusal| WalError::Corrupt { refusal })?;
        let mut discarded = None;
        if let Some(base) = decision.discard {
            let name = segment_file_name(base);
            tracing::warn!(segment = %name, "setting aside a segment whose header never became durable");
            files.pop();
            // Kept aside, not deleted: nothing in it was acknowledged, but
            // an operator may want to look.
            storage.rename(&name, &format!("{name}.torn")).await?;
            discarded = Some(name);
        }
        let mut metas = BTreeMap::new();
        for (scan, file) in scans.iter().zip(&files) {
            if !decision.keep.contains(&scan.base_lsn) {
                continue;
            }
            let header = scan.header.expect("kept segments have a valid header");
            metas.insert(
                scan.base_lsn,
                SegmentMeta {
                    base_lsn: scan.base_lsn,
                    base_chain: header.base_chain.get(),
                    end_lsn: scan.end.lsn,
                    file: file.clone(),
                },
            );
        }
        let tail = match metas.values().next_back() {
            Some(meta) => {
                let end_offset = offset_of(meta.base_lsn, meta.end_lsn);
                let block_start = end_offset - end_offset % BLOCK_BYTES;
                let len = (end_offset - block_start) as usize;
                let block = meta.file.read_at(block_start, len).await?;
                Some(Tail {
                    base_lsn: meta.base_lsn,
                    file: meta.file.clone(),
                    end_offset,
                    block,
                })
            }
            None => None,
        };
        if let Some(cut) = &decision.cut {
            tracing::warn!(segment = %cut.segment, offset = cut.offset, error = %cut.error,
                "log cut at a torn tail (provisional until checked against peers)");
        }
        if let Some(tail) = &tail {
            // Whatever lies past the end (a torn write's leftovers, a
            // recycled file's old life) is zeroed before anything new is
            // written after the end, whichever case decided it.
            let scan = scans
                .iter()
                .find(|s| s.base_lsn == tail.base_lsn)
                .expect("tail was scanned");
            if scan.dirty_end > tail.end_offset {
                zero_past_end(tail, scan.dirty_end).await?;
            }
        }
        // What recovery adopts may sit only in the device cache, or behind a
        // rename that was never synced (a process crash leaves both): make it
        // durable before anything is acknowledged on top of it.
        for meta in metas.values() {
            meta.file.sync().await?;
        }
        storage.sync_dir().await?;
        let report = RecoveryReport {
            case: decision.case,
            end_lsn: decision.end.lsn,
            segments: metas.len(),
            records,
            cut: decision.cut.clone(),
            discarded,
            // Records past the end (a cut tail) do not count.
            epochs: epochs
                .into_iter()
                .filter(|(_, start)| *start < decision.end.lsn)
                .collect(),
        };
        let segments = Segments {
            storage,
            metas: RefCell::new(metas),
            recycled: RefCell::default(),
            origin: decision.end,
        };
        Ok((segments, report, decision.end, tail))
    }

    /// A released segment file to reuse as the next segment, if there is one.
    pub fn take_recycled(&self) -> Option<String> {
        self.recycled.borrow_mut().pop_front()
    }

    pub fn has_recycled(&self) -> bool {
        !self.recycled.borrow().is_empty()
    }

    pub fn insert(&self, meta: SegmentMeta<S::File>) {
        self.metas.borrow_mut().insert(meta.base_lsn, meta);
    }

    pub fn set_end(&self, base_lsn: u64, end_lsn: u64) {
        if let Some(meta) = self.metas.borrow_mut().get_mut(&base_lsn) {
            meta.end_lsn = end_lsn;
        }
    }

    pub fn len(&self) -> usize {
        self.metas.borrow().len()
    }

    /// The segment holding `lsn` (the last one starting at or below it), and
    /// the base LSN and chain of the one after it.
    pub fn locate(&self, lsn: u64) -> Option<Located<S::File>> {
        let metas = self.metas.borrow();
        let (_, meta) = metas.range(..=lsn).next_back()?;
        let next = metas
            .range(meta.base_lsn + 1..)
            .next()
            .map(|(_, m)| (m.base_lsn, m.base_chain));
        Some(Located {
            base_lsn: meta.base_lsn,
            end_lsn: meta.end_lsn,
            file: meta.file.clone(),
            next,
        })
    }

    /// Where an empty log starts (see `Wal::open_at`).
    pub fn set_origin(&mut self, origin: Expect) {
        debug_assert_eq!(self.len(), 0);
        self.origin = origin;
    }

    pub fn first_position(&self) -> Expect {
        let metas = self.metas.borrow();
        metas.values().next().map_or(self.origin, |m| Expect {
            lsn: m.base_lsn,
            chain: m.base_chain,
            epoch: 0,
        })
    }

    /// Deletes (or recycles) every segment but the last whose records all lie
    /// below `lsn` and strictly below `durable_lsn`: a segment that ends
    /// exactly at the durable LSN may be followed by one whose header is not
    /// yet durable, and must stay until it is.
    pub async fn release_below(&self, lsn: u64, durable_lsn: u64) -> Result<usize, WalError> {
        let doomed: Vec<u64> = {
            let metas = self.metas.borrow();
            let last = metas.keys().next_back().copied();
            metas
                .values()
                .filter(|m| m.end_lsn <= lsn && m.end_lsn < durable_lsn && Some(m.base_lsn) != last)
                .map(|m| m.base_lsn)
                .collect()
        };
        let mut spares = Vec::new();
        for base in &doomed {
            self.metas.borrow_mut().remove(base);
            let name = segment_file_name(*base);
            if self.recycled.borrow().len() + spares.len() < RECYCLED_MAX {
                // Keep the file, written blocks and all, as the next spare:
                // its old records are bound to older LSNs and never validate
                // in a new life.
                let spare = format!("{base:020}{RECYCLED_SUFFIX}");
                self.storage.rename(&name, &spare).await?;
                spares.push(spare);
            } else {
                self.storage.remove(&name).await?;
            }
        }
        if !doomed.is_empty() {
            self.storage.sync_dir().await?;
        }
        // Only once the old name is durably gone may the file be written as
        // a new segment: else a crash could bring it back under its old name
        // holding the new segment's records.
        self.recycled.borrow_mut().extend(spares);
        Ok(doomed.len())
    }
}

/// Zeroes the bytes left past the end of the log, so that a later recovery
/// cannot mistake them for records after new ones. Synced by the caller.
async fn zero_past_end<F: StorageFile>(tail: &Tail<F>, dirty_end: u64) -> Result<(), WalError> {
    const CHUNK: u64 = 1 << 20;
    let block_start = tail.end_offset - tail.end_offset % BLOCK_BYTES;
    let end = dirty_end.next_multiple_of(BLOCK_BYTES);
    // The block holding the end keeps its prefix; whole blocks after it go
    // to zero in 1 MiB writes.
    tail.file.write_at(block_start, &[&tail.block]).await?;
    let zeros = vec![0u8; CHUNK as usize];
    let mut pos = block_start + BLOCK_BYTES;
    while pos < end {
        let n = CHUNK.min(end - pos);
        tail.file.write_at(pos, &[&zeros[..n as usize]]).await?;
        pos += n;
    }
    Ok(())
}

/// Largest segment file recovery reads; anything bigger is not a segment.
pub(super) const SEGMENT_BYTES_MAX: u64 = 1 << 30;
const SPARE_SUFFIX: &str = ".spare";
const RECYCLED_SUFFIX: &str = ".recycled.spare";
/// Most released segments kept as spares; the rest are deleted.
const RECYCLED_MAX: usize = 2;
const TMP_SUFFIX: &str = ".spare.tmp";

/// Removes every spare left by an earlier run. A spare is not trusted across
/// a restart: if its rename into a segment name was lost in a crash, it holds
/// records of a segment that never became durable, which could sit at the
/// very places the next life of the log writes to.
async fn remove_stale_temporaries<S: Storage>(storage: &S) -> Result<(), WalError> {
    for name in storage.list().await? {
        if name.ends_with(SPARE_SUFFIX) || name.ends_with(TMP_SUFFIX) {
            match storage.remove(&name).await {
                // Gone already: a dropped instance's spare task moved it.
                Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
    }
    Ok(())
}

/// Makes a spare segment file: create, fill, sync, then rename into place.
/// Returns its name. `pace` is asked, as zeros are written, how soon the
/// log may need the spare (see `zero_fill`).
pub(super) async fn prepare_spare<S: Storage>(
    storage: &S,
    seq: u64,
    segment_bytes: u64,
    fill: SegmentFill,
    pace: impl Fn(u64) -> ZeroPace,
) -> Result<String, WalError> {
    let tmp = format!("{seq:020}{TMP_SUFFIX}");
    let name = format!("{seq:020}{SPARE_SUFFIX}");
    let file = storage.create_sync_at_end(&tmp).await?;
    match fill {
        SegmentFill::Zeros => zero_fill(&file, segment_bytes, pace).await?,
        SegmentFill::Allocate => {
            file.allocate(segment_bytes).await?;
            file.sync().await?;
        }
    }
    drop(file);
    storage.rename(&tmp, &name).await?;
    Ok(name)
}
