//! Recovery: from the segments on disk to the position where the log ends.
//!
//! Every segment is scanned on its own ([`scan_segment`]); then [`decide`]
//! walks the scans in LSN order and applies one row of this table to each.
//! Whether a bad record at the end is a torn write or corruption of an acked
//! record cannot be told from one disk, so the truncation of a torn tail is
//! reported as provisional: a node re-checks it against its peers before it
//! serves or streams past that point.
//!
//! | case            | what the segment shows                                                  | decision                          |
//! |-----------------|-------------------------------------------------------------------------|-----------------------------------|
//! | `Empty`         | no segment files                                                        | new log at LSN 0                  |
//! | `Intact`        | valid header; records then unwritten space (or a full file)             | continue / log ends here          |
//! | `TornTail`      | last segment; a bad record no later record proves acknowledged          | truncate there (provisional)      |
//! | `TornRotation`  | last segment; header block zeros or an older life's, nothing in it proves it durable | set the file aside |
//! | `CorruptRecord` | a bad record a later record proves acknowledged (unless the log is a replica's: then `TornTail`, the rest fetched again), or a bad record in a segment that is not the last | refuse: `Corrupt` |
//! | `CorruptHeader` | any other invalid header, or one on a segment that is not the last or proven durable, or on a first segment not at LSN 0 | refuse: `Corrupt` |
//!
//! A later record proves damage at LSN `d` acknowledged when its header is
//! bound to its place and its `durable_gap` says the log was durable past `d`
//! when it was staged (FORMAT.md). Several unsynced writes may be in flight,
//! and a power cut may keep a later one and lose an earlier one: their
//! records prove nothing, so that case is a torn tail, not corruption.
//! | `Gap`           | a segment does not start where the previous one ended (LSN or chain)    | refuse: `Gap`                     |
//!
//! A refusal names the segment and the file offset of the first bad byte.

use crate::format::{Expect, FormatError, segment_file_name};

use super::scan::{ScanStop, SegmentScan};

/// One row of the decision table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    Empty,
    Intact,
    TornTail,
    TornRotation,
    CorruptRecord,
    CorruptHeader,
    Gap,
}

/// What recovery found, when the log can be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The segments that stay, by base LSN.
    pub keep: Vec<u64>,
    /// Where the next record goes.
    pub end: Expect,
    /// The row that decided the end of the log.
    pub case: Case,
    /// For `TornTail`: the segment and offset where the log was cut.
    pub cut: Option<Cut>,
    /// For `TornRotation`: the segment file to discard.
    pub discard: Option<u64>,
}

/// Where a torn tail was cut and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub segment: String,
    pub offset: u64,
    pub error: FormatError,
    /// File offset past the last non-zero byte: the bytes up to here beyond
    /// the cut are zeroed before the log is written again.
    pub dirty_end: u64,
}

/// Why the log cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub case: Case,
    pub segment: String,
    pub offset: u64,
    pub why: String,
}

/// Applies the decision table to the scans of every segment, in LSN order.
///
/// `refetchable`: the log's records came from an upstream that holds them
/// (a replica), so a bad record in the last segment that a later record
/// proves acknowledged is cut as a torn tail (`TornTail`, provisional)
/// rather than refused: the proof speaks of the upstream's durability.
pub fn decide(scans: &[SegmentScan], refetchable: bool) -> Result<Decision, Refusal> {
    let Some(first) = scans.first() else {
        return Ok(Decision {
            keep: Vec::new(),
            end: Expect {
                lsn: 0,
                chain: 0,
                epoch: 0,
            },
            case: Case::Empty,
            cut: None,
            discard: None,
        });
    };
    let mut end: Option<Expect> = None;
    let mut keep = Vec::new();
    for (i, scan) in scans.iter().enumerate() {
        let last = i + 1 == scans.len();
        let name = segment_file_name(scan.base_lsn);
        if let (Some(prev), Some(header)) = (end, scan.header)
            && (prev.lsn != scan.base_lsn || prev.chain != header.base_chain.get())
        {
            {
                return Err(Refusal {
                    case: Case::Gap,
                    segment: name,
                    offset: 0,
                    why: format!(
                        "segment starts at lsn {} chain {:#010x}, the log before it ends at lsn {} chain {:#010x}",
                        scan.base_lsn,
                        header.base_chain.get(),
                        prev.lsn,
                        prev.chain
                    ),
                });
            }
        }
        match &scan.stop {
            ScanStop::BadHeader { error } => {
                // Without a segment before it the log's history up to this
                // one is unknown, unless it is the very start of the log.
                let orphan = end.is_none() && scan.base_lsn != 0;
                if !last || scan.acked_after || !scan.header_unwritten || orphan {
                    return Err(Refusal {
                        case: Case::CorruptHeader,
                        segment: name,
                        offset: 0,
                        why: error.to_string(),
                    });
                }
                let end = end.unwrap_or(Expect {
                    lsn: first.base_lsn,
                    chain: 0,
                    epoch: 0,
                });
                if end.lsn != scan.base_lsn {
                    return Err(Refusal {
                        case: Case::Gap,
                        segment: name,
                        offset: 0,
                        why: format!(
                            "segment named for lsn {} after a log ending at {}",
                            scan.base_lsn, end.lsn
                        ),
                    });
                }
                return Ok(Decision {
                    keep,
                    end,
                    case: Case::TornRotation,
                    cut: None,
                    discard: Some(scan.base_lsn),
                });
            }
            ScanStop::BadRecord { offset, error } => {
                if !last || (scan.acked_after && !refetchable) {
                    return Err(Refusal {
                        case: Case::CorruptRecord,
                        segment: name,
                        offset: *offset,
                        why: error.to_string(),
                    });
                }
                keep.push(scan.base_lsn);
                return Ok(Decision {
                    keep,
                    end: scan.end,
                    case: Case::TornTail,
                    cut: Some(Cut {
                        segment: name,
                        offset: *offset,
                        error: error.clone(),
                        dirty_end: scan.dirty_end,
                    }),
                    discard: None,
                });
            }
            ScanStop::Clean => {
                keep.push(scan.base_lsn);
                end = Some(scan.end);
            }
        }
    }
    let last = &scans[scans.len() - 1];
    let cut = (last.dirty_end > last.end_offset()).then(|| Cut {
        segment: segment_file_name(last.base_lsn),
        offset: last.end_offset(),
        error: FormatError::Zeroed { lsn: last.end.lsn },
        dirty_end: last.dirty_end,
    });
    Ok(Decision {
        keep,
        end: last.end,
        case: Case::Intact,
        cut,
        discard: None,
    })
}
