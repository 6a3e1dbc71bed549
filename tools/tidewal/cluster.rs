//! Local clusters for the demo and the replication benchmark: `tidewal
//! node` processes on loopback, a minimal RESP client, and the status
//! endpoint.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// A `tidewal node` child process; stopped (SIGTERM) when dropped.
pub struct NodeChild {
    pub name: String,
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// With `--sentinel` among its flags: its Sentinel port.
    pub sentinel: Option<SocketAddr>,
}

impl NodeChild {
    /// Starts `tidewal node` over `dir` on free loopback ports.
    pub fn start(name: &str, dir: &Path, extra: &[String]) -> anyhow::Result<NodeChild> {
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("node.log"))?;
        let mut command = Command::new(std::env::current_exe()?);
        let mut child = stop_with_parent(&mut command)
            .arg("node")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--node-id", name, "--print-addresses"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting tidewal node")?;
        let mut out = BufReader::new(child.stdout.take().context("stdout")?);
        let mut addr = |want: &str| -> anyhow::Result<SocketAddr> {
            let mut line = String::new();
            out.read_line(&mut line)?;
            line.strip_prefix(want)
                .and_then(|rest| rest.trim().parse().ok())
                .with_context(|| format!("expected `{want}ADDR`, got {line:?}"))
        };
        let with_sentinel = extra.iter().any(|a| a == "--sentinel");
        let addrs = addr("listen ").and_then(|l| {
            let admin = addr("admin ")?;
            let sentinel = match with_sentinel {
                true => Some(addr("sentinel ")?),
                false => None,
            };
            Ok((l, admin, sentinel))
        });
        match addrs {
            Ok((listen, admin, sentinel)) => Ok(NodeChild {
                name: name.to_string(),
                child,
                listen,
                admin,
                sentinel,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
                bail!("node {name} did not start: {e}\n{log}")
            }
        }
    }

    pub fn status(&self) -> anyhow::Result<Value> {
        let body = http_get(self.admin, "/admin/replication/status")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// `(head_lsn, chain)` of every shard.
    pub fn positions(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        Ok(self.status()?["shards"]
            .as_array()
            .context("shards")?
            .iter()
            .map(|s| {
                (
                    s["head_lsn"].as_u64().unwrap_or(0),
                    s["chain"].as_u64().unwrap_or(0),
                )
            })
            .collect())
    }

    /// Stops the node with SIGTERM and waits for it.
    pub fn stop(mut self) {
        self.terminate();
    }

    /// Kills the node at once (SIGKILL: no clean stop, as a crash).
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    fn terminate(&mut self) {
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// Makes the process `command` starts get SIGTERM (a clean stop, for a
/// node or a Redis server) when this one dies, so that a harness killed by
/// a signal leaves no server running on its scratch data.
pub fn stop_with_parent(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        })
    }
}

/// Waits until `check` holds for the node's status.
pub fn wait_status(
    node: &NodeChild,
    what: &str,
    limit: Duration,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    loop {
        let s = node.status()?;
        if check(&s) {
            return Ok(s);
        }
        if started.elapsed() > limit {
            bail!("{}: {what} did not happen within {limit:?}: {s}", node.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every node of `others` holds exactly `primary`'s logs;
/// returns how long it took.
pub fn wait_converged(
    primary: &NodeChild,
    others: &[&NodeChild],
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let want = primary.positions()?;
        let mut all = true;
        for other in others {
            all &= other.positions()? == want;
        }
        if all {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("replicas did not converge within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 GET; the body.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut all = String::new();
    s.read_to_string(&mut all)?;
    let (head, body) = all.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// A blocking RESP2 client: one command at a time.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    out: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            out: Vec::new(),
        })
    }

    /// Sends a command and reads its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        self.out.clear();
        write!(self.out, "*{}\r\n", args.len())?;
        for a in args {
            write!(self.out, "${}\r\n", a.len())?;
            self.out.extend_from_slice(a);
            self.out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&self.out)?;
        self.read_reply()
    }

    /// Like [`Client::call`], but a `-ERR` reply is an error.
    pub fn ok(&mut self, args: &[&[u8]]) -> anyhow::Result<Reply> {
        match self.call(args)? {
            Reply::Error(e) => bail!("{e}"),
            r => Ok(r),
        }
    }

    fn read_reply(&mut self) -> std::io::Result<Reply> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        if line.len() < 3 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let text = String::from_utf8_lossy(&line[1..line.len() - 2]).to_string();
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad reply");
        Ok(match line[0] {
            b'+' => Reply::Simple(text),
            b'-' => Reply::Error(text),
            b':' => Reply::Int(text.parse().map_err(|_| bad())?),
            b'$' => {
                let n: i64 = text.parse().map_err(|_| bad())?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut v = vec![0; n as usize + 2];
                    self.reader.read_exact(&mut v)?;
                    v.truncate(n as usize);
                    Reply::Bulk(Some(v))
                }
            }
            b'*' => {
                let n: i64 = text.parse().map_err(|_| bad())?;
                let mut all = Vec::new();
                for _ in 0..n.max(0) {
                    all.push(self.read_reply()?);
                }
                Reply::Array(all)
            }
            _ => return Err(bad()),
        })
    }
}

/// A latency histogram in microseconds, up to a minute.
pub fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Where the demo and the benchmark put their nodes' data: under
/// `target/` when run from the repository (a real disk, where O_DIRECT
/// works; `/tmp` is often tmpfs), else the system's temporary directory.
///
/// The directory is removed when the returned guard drops, which a run
/// killed by a signal (Ctrl-C, `timeout`) never does: a replication
/// benchmark leaves gigabytes behind. So each directory names its owner in
/// an `owner.pid` file, and this first removes the directories of the same
/// prefix whose owner is no longer running.
pub fn scratch_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let base = if Path::new("target").is_dir() {
        PathBuf::from("target")
    } else {
        std::env::temp_dir()
    };
    let (removed, bytes) = remove_stale_scratch(&base, prefix);
    if removed > 0 {
        println!(
            "removed {removed} scratch director{} of interrupted runs under {} ({:.1} GB)",
            if removed == 1 { "y" } else { "ies" },
            base.display(),
            bytes as f64 / 1e9
        );
    }
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(base)?;
    std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())?;
    Ok(dir)
}

const OWNER_FILE: &str = "owner.pid";

/// Removes the directories `base/{prefix}*` whose `owner.pid` names a
/// process that no longer exists, after stopping any PostgreSQL server
/// still running on them. Returns how many, and their bytes.
/// Directories without the file (another tool's, or an older run's) are
/// left alone.
fn remove_stale_scratch(base: &Path, prefix: &str) -> (usize, u64) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return (0, 0);
    };
    let (mut removed, mut bytes) = (0, 0);
    for entry in entries.flatten() {
        let path = entry.path();
        let named = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix));
        let owner = std::fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let Some(pid) = owner.filter(|_| named) else {
            continue;
        };
        if pid == std::process::id() as i32 || process_exists(pid) {
            continue;
        }
        stop_postmasters(&path, 3);
        let size = dir_bytes(&path);
        if std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
            bytes += size;
        }
    }
    (removed, bytes)
}

/// Stops the PostgreSQL servers (`postmaster.pid`) under `dir`, down to
/// `depth` levels: `pg_ctl` detaches them, so they outlive a harness that
/// was killed. SIGQUIT is PostgreSQL's immediate shutdown.
fn stop_postmasters(dir: &Path, depth: usize) {
    let pid = std::fs::read_to_string(dir.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok());
    if let Some(pid) = pid.filter(|&p| p > 0 && process_exists(p)) {
        // SAFETY: a signal to the server recorded in its own pid file.
        unsafe { libc::kill(pid, libc::SIGQUIT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_exists(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if depth == 0 {
        return;
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            stop_postmasters(&entry.path(), depth - 1);
        }
    }
}

fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    // EPERM: it exists, owned by someone else.
    alive || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_of_a_dead_owner_is_removed_and_a_live_ones_kept() {
        let base = tempfile::tempdir().unwrap();
        let make = |name: &str, owner: Option<String>| {
            let dir = base.path().join(name);
            std::fs::create_dir_all(dir.join("data")).unwrap();
            std::fs::write(dir.join("data/seg"), vec![0u8; 1000]).unwrap();
            if let Some(pid) = owner {
                std::fs::write(dir.join(OWNER_FILE), pid).unwrap();
            }
            dir
        };
        // A child that has exited and been reaped: its pid names no process.
        let mut child = Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        let dead = make("bench-a", Some(child.id().to_string()));
        let live = make("bench-b", Some(std::process::id().to_string()));
        let unowned = make("bench-c", None);
        let other = make("other-d", Some(child.id().to_string()));
        let owner_bytes = child.id().to_string().len() as u64;
        assert_eq!(
            remove_stale_scratch(base.path(), "bench-"),
            (1, 1000 + owner_bytes)
        );
        assert!(!dead.exists());
        assert!(live.exists() && unowned.exists() && other.exists());
    }
}
