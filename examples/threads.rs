//! tidewal embedded in a service that uses plain threads.
//!
//! `cargo run --release --example threads -- DIR`

use tidewal::engine::{Engine, Options, block_on};

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tidewal-example-threads".into());
    let engine = Engine::open(&dir, Options::new())?;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let engine = engine.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                for i in 0..1000 {
                    // Returns once the write is durable (the default level).
                    let receipt =
                        block_on(engine.put(format!("user:{w}:{i}"), format!("{{\"n\":{i}}}")))?;
                    if i == 999 {
                        println!(
                            "worker {w}: last write at shard {} lsn {}",
                            receipt.shard, receipt.lsn
                        );
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker panicked")?;
    }
    let sample = block_on(engine.scan_prefix("user:2:99", 5))?;
    for (k, v) in sample {
        println!(
            "{} = {}",
            String::from_utf8_lossy(&k),
            String::from_utf8_lossy(&v)
        );
    }
    block_on(engine.close())?;
    Ok(())
}
