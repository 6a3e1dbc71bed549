//! tidewal embedded in a tokio service: the handle is `Send + Sync` and its
//! futures run on any runtime; the engine's own I/O stays on its glommio
//! executors.
//!
//! `cargo run --release --example tokio -- DIR`

use tidewal::engine::{CommitLevel, Engine, Options};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tidewal-example-tokio".into());
    let engine = Engine::open(&dir, Options::new())?;
    let mut tasks = Vec::new();
    for t in 0..32 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                engine.put(format!("session:{t}:{i}"), "active").await?;
            }
            // A write that need not wait for the disk.
            engine
                .put_at(format!("hint:{t}"), "warm", CommitLevel::Memory)
                .await?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    println!(
        "{} sessions",
        engine.scan_prefix("session:", usize::MAX).await?.len()
    );
    engine.close().await?;
    Ok(())
}
