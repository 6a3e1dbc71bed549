//! `tidewal wal inspect`: reads segment files with plain std I/O (so it works
//! on any filesystem and needs no io_uring), runs the same scan and decision
//! table as recovery, and prints what it finds.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use tidewal::format::{LogId, RecordKind, SegmentHeader, parse_segment_file_name};
use tidewal::wal::{Case, ScanStop, decide, scan_segment};

pub fn run(dir: &Path, summary: bool) -> anyhow::Result<ExitCode> {
    let mut bases: Vec<u64> = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()
                .and_then(parse_segment_file_name)
        })
        .collect();
    bases.sort_unstable();
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let mut log: Option<LogId> = None;
    let mut scans = Vec::new();
    for base in bases {
        let name = tidewal::format::segment_file_name(base);
        let bytes = std::fs::read(dir.join(&name)).with_context(|| format!("reading {name}"))?;
        // The first segment with a sound header names the log; every other
        // segment must belong to the same one.
        let log = *log.get_or_insert_with(|| {
            SegmentHeader::peek_log(&bytes).unwrap_or(LogId {
                cluster_id: [0; 16],
                shard: u32::MAX,
            })
        });
        let floor = scans
            .last()
            .map_or(0, |s: &tidewal::wal::SegmentScan| s.end.epoch);
        let mut lines = Vec::new();
        let scan = scan_segment(&bytes, log, base, floor, |r| {
            if !summary {
                lines.push(format!(
                    "  lsn {:>14}  epoch {:>4}  kind {:<11}  len {:>8}  chain {:#010x}",
                    r.lsn(),
                    r.epoch(),
                    kind_name(r.kind()),
                    r.body.len(),
                    r.checksum()
                ));
            }
        });
        match &scan.header {
            Some(h) => writeln!(
                out,
                "segment {name}  base_lsn {}  epoch {}  base_chain {:#010x}  shard {}  records {}  end_lsn {}",
                h.base_lsn.get(),
                h.epoch.get(),
                h.base_chain.get(),
                h.shard.get(),
                scan.records,
                scan.end.lsn
            )?,
            None => writeln!(out, "segment {name}  (header does not validate)")?,
        }
        for line in lines {
            writeln!(out, "{line}")?;
        }
        if let ScanStop::BadRecord { offset, error } = &scan.stop {
            writeln!(out, "  stop at offset {offset}: {error}")?;
        }
        scans.push(scan);
    }
    let records: u64 = scans.iter().map(|s| s.records).sum();
    let verdict = match decide(&scans, false) {
        Ok(d) => match d.case {
            Case::Empty => Ok("empty log".to_string()),
            Case::Intact => {
                let note = d.cut.map_or(String::new(), |c| {
                    format!(
                        " ({} stray bytes after the end in {}, unused)",
                        c.dirty_end - c.offset,
                        c.segment
                    )
                });
                Ok(format!(
                    "log intact: {} segments, {records} records, lsn {}..{}{note}",
                    d.keep.len(),
                    scans[0].base_lsn,
                    d.end.lsn
                ))
            }
            Case::TornTail => {
                let cut = d.cut.expect("a torn tail has a cut");
                Err(format!(
                    "torn tail: segment {} offset {}: {} (recovery would cut the log at lsn {})",
                    cut.segment, cut.offset, cut.error, d.end.lsn
                ))
            }
            Case::TornRotation => Err(format!(
                "torn rotation: segment {} offset 0: header never became durable (recovery would discard it)",
                tidewal::format::segment_file_name(d.discard.unwrap_or_default())
            )),
            other => Err(format!("unexpected case {other:?}")),
        },
        Err(r) => Err(format!(
            "corrupt: segment {} offset {}: {}",
            r.segment, r.offset, r.why
        )),
    };
    match verdict {
        Ok(line) => {
            writeln!(out, "{line}")?;
            Ok(ExitCode::SUCCESS)
        }
        Err(line) => {
            writeln!(out, "{line}")?;
            out.flush()?;
            eprintln!("{line}");
            Ok(ExitCode::from(1))
        }
    }
}

fn kind_name(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::Data => "data",
        RecordKind::EpochStart => "epoch-start",
        RecordKind::Noop => "noop",
    }
}
