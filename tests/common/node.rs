//! Starting the real `tidewal node` binary for integration tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Writes `toml` to `dir/name`: the path, as `--config` takes it.
pub fn config_file(dir: &Path, name: &str, toml: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, toml).expect("write the config file");
    path.to_str().expect("a UTF-8 path").to_string()
}

/// Waits (up to 30 s) until `replica` holds exactly `primary`'s logs
/// (`(head_lsn, chain)` of every shard).
pub fn wait_converged(primary: &NodeProcess, replica: &NodeProcess) {
    let started = Instant::now();
    loop {
        let (p, r) = (positions(primary), positions(replica));
        if p == r {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "replica did not converge: primary {p:?}, replica {r:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `tidewal ARGS` to its end: (success, stdout then stderr).
pub fn tidewal(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidewal"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run tidewal");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A running node process; killed when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// With `--sentinel`: where it answers as a Redis Sentinel.
    pub sentinel: Option<SocketAddr>,
    pub dir: PathBuf,
}

impl NodeProcess {
    /// Starts a node on free ports over `dir`, with `extra` flags.
    pub fn start(dir: &Path, extra: &[&str]) -> NodeProcess {
        Self::try_start(dir, extra).expect("node starts")
    }

    pub fn try_start(dir: &Path, extra: &[&str]) -> Result<NodeProcess, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidewal"))
            .arg("node")
            .arg("--data-dir")
            .arg(dir)
            .args(defaults_unless_given(extra))
            .arg("--print-addresses")
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log_file(dir))
            .spawn()
            .expect("spawn tidewal node");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut addr = |want: &str| -> Result<SocketAddr, String> {
            let mut line = String::new();
            out.read_line(&mut line).map_err(|e| e.to_string())?;
            line.strip_prefix(want)
                .and_then(|rest| rest.trim().parse().ok())
                .ok_or_else(|| format!("expected `{want}ADDR`, got {line:?}"))
        };
        let with_sentinel = extra.contains(&"--sentinel");
        let addrs = addr("listen ").and_then(|l| {
            let admin = addr("admin ")?;
            let sentinel = match with_sentinel {
                true => Some(addr("sentinel ")?),
                false => None,
            };
            Ok((l, admin, sentinel))
        });
        match addrs {
            Ok((listen, admin, sentinel)) => Ok(NodeProcess {
                child,
                listen,
                admin,
                sentinel,
                dir: dir.to_path_buf(),
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let err = std::fs::read_to_string(log_path(dir)).unwrap_or_default();
                Err(format!("{e}; stderr: {err}"))
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.listen)
    }

    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("redis client connects")
    }

    /// `kill -TERM`, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for node");
        std::mem::forget(self);
        status
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    /// Resident memory of the process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// One HTTP request to the admin port: (status, body).
    pub fn http(&self, request: &[u8]) -> (u16, String) {
        http(self.admin, request)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.http(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
    }

    /// The sum over every series of the Prometheus metric `name` (all its
    /// shards), read from `/metrics` now.
    pub fn metric(&self, name: &str) -> f64 {
        let (status, metrics) = self.get("/metrics");
        assert_eq!(status, 200);
        metrics
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }
}

/// Free ports for the addresses `extra` does not set.
fn defaults_unless_given(extra: &[&str]) -> Vec<&'static str> {
    let mut args = Vec::new();
    for flag in ["--listen", "--admin"] {
        if !extra.contains(&flag) {
            args.extend([flag, "127.0.0.1:0"]);
        }
    }
    args
}

/// The node's stderr goes to a file in its data directory.
fn log_path(dir: &Path) -> PathBuf {
    dir.join("node-stderr.log")
}

fn log_file(dir: &Path) -> std::fs::File {
    std::fs::create_dir_all(dir).expect("data directory");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(dir))
        .expect("node log file")
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(log_path(&self.dir)).unwrap_or_default();
            eprintln!("--- node log ---\n{log}");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sends raw bytes on a fresh client connection and returns what came back
/// before the node closed it (or 2 s passed).
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(2) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    out
}

/// A tool from redis-tools, or `None` (the test then says it skipped). In
/// CI (`CI` set) a missing tool fails the test: `.ci/run` installs them.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing; .ci/run installs redis-tools"
        );
        eprintln!("{name} not installed: skipping this part");
    }
    found
}

/// The node's `GET /admin/replication/status`, parsed.
pub fn status(node: &NodeProcess) -> serde_json::Value {
    let (code, body) = node.get("/admin/replication/status");
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

/// `(head_lsn, chain)` of every shard: equal on two nodes, equal logs.
pub fn positions(node: &NodeProcess) -> Vec<(u64, u64)> {
    status(node)["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["head_lsn"].as_u64().unwrap(),
                s["chain"].as_u64().unwrap(),
            )
        })
        .collect()
}
