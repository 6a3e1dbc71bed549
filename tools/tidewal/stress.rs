//! `tidewal wal stress`: many appenders against one log on the real disk,
//! printing an `ack WHO SEQ LSN` line only after the append's sync returned.
//! Kill it with SIGKILL at any moment: every printed ack must survive.
//!
//! Bodies are `"{who}:{seq}:"` followed by a fill that depends on who, seq
//! and position, so a reader can tell a record that was written from garbage.

use std::cell::RefCell;
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;

use tidewal::format::{LogId, RecordKind};
use tidewal::{DirectIo, DmaStorage, Wal, WalOptions};

/// The log identity the stress tool writes under.
pub const STRESS_LOG: LogId = LogId {
    cluster_id: *b"tidewal-stress\0\0",
    shard: 0,
};

#[derive(clap::Args)]
pub struct StressArgs {
    /// Directory of the log (created if missing; an existing log is appended to).
    #[arg(long)]
    dir: PathBuf,
    /// Concurrent appenders.
    #[arg(long, default_value_t = 8)]
    appenders: usize,
    /// Body bytes of each record (at least what `who:seq:` needs).
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Records per appender; 0 appends until killed.
    #[arg(long, default_value_t = 0)]
    records: usize,
    /// Segment file size in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    segment_bytes: u64,
    /// Run where O_DIRECT is not in effect (tmpfs), with buffered I/O.
    #[arg(long)]
    allow_buffered: bool,
}

/// The body of the `seq`-th record of appender `who`.
pub fn stress_body(who: usize, seq: usize, len: usize) -> Vec<u8> {
    let mut b = format!("{who}:{seq}:").into_bytes();
    while b.len() < len {
        b.push(b'a' + ((who + seq + b.len()) % 26) as u8);
    }
    b
}

pub fn run(args: StressArgs) -> anyhow::Result<()> {
    let executor = glommio::LocalExecutorBuilder::default()
        .make()
        .map_err(|e| anyhow::anyhow!("starting the glommio executor (io_uring): {e}"))?;
    executor.run(async move {
        let policy = if args.allow_buffered {
            DirectIo::AllowBuffered
        } else {
            DirectIo::Require
        };
        let storage = DmaStorage::open(&args.dir, policy).await?;
        let mut options = WalOptions::new(STRESS_LOG);
        options.segment_bytes = args.segment_bytes;
        let wal = Rc::new(Wal::open(storage, options).await?);
        let out = Rc::new(RefCell::new(std::io::BufWriter::new(std::io::stdout())));
        let tasks: Vec<_> = (0..args.appenders)
            .map(|who| {
                let (wal, out) = (wal.clone(), out.clone());
                let (records, len) = (args.records, args.body_bytes);
                glommio::spawn_local(async move {
                    let mut seq = 0;
                    while records == 0 || seq < records {
                        let receipt = wal
                            .append(RecordKind::Data, &stress_body(who, seq, len))
                            .await?;
                        let mut out = out.borrow_mut();
                        writeln!(out, "ack {who} {seq} {}", receipt.lsn)?;
                        if seq % 16 == 0 {
                            out.flush()?;
                        }
                        seq += 1;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await?;
        }
        out.borrow_mut().flush()?;
        let wal = Rc::try_unwrap(wal).map_err(|_| anyhow::anyhow!("log still shared"))?;
        wal.close().await?;
        anyhow::Ok(())
    })
}
