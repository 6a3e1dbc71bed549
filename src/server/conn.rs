//! One client connection: read, parse, run, reply in order.
//!
//! Every command parsed from what arrived is started before any reply is
//! awaited, so a pipeline of writes reaches the shards together and shares
//! their group commits; replies still go out in request order. A command
//! that reads waits for the writes before it in the same pipeline first, so
//! a client always sees its own earlier writes. Writes reach each shard in
//! the order they were sent (the engine's requests are sent eagerly, and the
//! WAL serves staging space first come first served).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::Shared;
use super::commit::{self, Commit, Shortfall};
use super::glob;
use super::resp::{self, Reply};
use crate::engine::{BatchAtomicity, BatchOp, EngineError, ShardReceipt, Update};

/// How often an idle connection looks whether the node is stopping.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 << 10;
/// Longest glob pattern (matching costs pattern length x key length).
const PATTERN_BYTES_MAX: usize = 4096;
const PATTERN_TOO_LONG: &str = "pattern is over 4096 bytes";

type Later = Pin<Box<dyn Future<Output = Reply>>>;

/// A reply that is ready, or on its way.
enum Slot {
    Ready(Reply),
    Later(Later),
}

/// What a command asks of the connection besides its reply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    Continue,
    Close,
    /// Become the upstream side of a replication stream.
    Stream,
    /// Send a backup of every shard, then close (`backup.rs`).
    Backup,
    /// On the Sentinel port: serve `SUBSCRIBE +switch-master` from now on
    /// (`sentinel::pubsub`).
    Subscribe,
}

struct Conn {
    shared: Arc<Shared>,
    id: u64,
    name: Option<Bytes>,
    /// A write of this pipeline has been started and not yet answered.
    writes_pending: bool,
    /// What this connection's writes wait for (`CLIENT COMMIT-LEVEL`).
    level: Commit,
    /// Per shard, the LSN of this connection's last acknowledged write:
    /// what `WAIT` waits for replicas to have, and the session token.
    written: Written,
    /// The level the last acknowledged write asked for and reached.
    last: std::rc::Rc<std::cell::Cell<Option<(Commit, Commit)>>>,
    /// The highest epoch of this connection's acknowledged writes.
    epoch: std::rc::Rc<std::cell::Cell<u64>>,
    /// Reads wait until this node has applied these writes
    /// (`CLIENT READ-AFTER`), up to the duration.
    read_after: Option<(Token, Duration)>,
    /// The address the client reached this node at (`SENTINEL` names the
    /// primary by its IP when it is this node and listens on every address).
    local: Option<std::net::SocketAddr>,
    /// A connection to the Sentinel port.
    sentinel: bool,
    /// The client switched to RESP3 (`HELLO 3`).
    resp3: bool,
    /// A MULTI was refused and its EXEC or DISCARD has not come: the
    /// commands in between are not run (the client takes them for part
    /// of a transaction).
    in_refused_multi: bool,
    /// The SUBSCRIBE (or PSUBSCRIBE) that turned a Sentinel connection to
    /// pub/sub.
    subscribe: Vec<Bytes>,
}

type Written = std::rc::Rc<std::cell::RefCell<BTreeMap<u32, u64>>>;

/// Why a write was not acknowledged.
enum Failure {
    Engine(EngineError),
    /// Durable here, but its replicas did not answer in time (`fail`).
    Short(Shortfall),
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        Failure::Engine(e)
    }
}

/// Answers that carry receipts of writes.
trait Receipts {
    fn note(&self, written: &mut BTreeMap<u32, u64>);
    fn epoch(&self) -> u64;
}

impl Receipts for ShardReceipt {
    fn note(&self, written: &mut BTreeMap<u32, u64>) {
        let lsn = written.entry(self.shard).or_insert(self.lsn);
        *lsn = (*lsn).max(self.lsn);
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl Receipts for Option<ShardReceipt> {
    fn note(&self, written: &mut BTreeMap<u32, u64>) {
        if let Some(r) = self {
            r.note(written);
        }
    }

    fn epoch(&self) -> u64 {
        self.map_or(0, |r| r.epoch)
    }
}

impl Receipts for Vec<ShardReceipt> {
    fn note(&self, written: &mut BTreeMap<u32, u64>) {
        self.iter().for_each(|r| r.note(written));
    }

    fn epoch(&self) -> u64 {
        self.iter().map(|r| r.epoch).max().unwrap_or(0)
    }
}

/// A session token: the epoch and, per shard, the LSN of the last write a
/// client saw acknowledged. Text form `EPOCH/SHARD:LSN,SHARD:LSN...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Token {
    pub epoch: u64,
    pub lsns: BTreeMap<u32, u64>,
}

impl Token {
    fn parse(text: &[u8]) -> Option<Token> {
        let text = std::str::from_utf8(text).ok()?;
        let (epoch, rest) = text.split_once('/')?;
        let mut lsns = BTreeMap::new();
        for part in rest.split(',').filter(|p| !p.is_empty()) {
            let (shard, lsn) = part.split_once(':')?;
            lsns.insert(shard.parse().ok()?, lsn.parse().ok()?);
        }
        Some(Token {
            epoch: epoch.parse().ok()?,
            lsns,
        })
    }

    fn render(&self) -> String {
        let lsns: Vec<String> = self.lsns.iter().map(|(s, l)| format!("{s}:{l}")).collect();
        format!("{}/{}", self.epoch, lsns.join(","))
    }
}

/// SCAN cursors of the whole node: number → the last key returned. Any
/// connection may continue an iteration (client libraries with pools do);
/// the newest [`CURSORS_MAX`] are kept, within [`CURSOR_BYTES_MAX`] of keys.
#[derive(Default)]
pub(super) struct Cursors {
    keys: HashMap<u64, Bytes>,
    order: VecDeque<u64>,
    bytes: usize,
    next: u64,
}

const CURSORS_MAX: usize = 65_536;
const CURSOR_BYTES_MAX: usize = 64 << 20;

impl Cursors {
    fn file(&mut self, cursor: u64, key: &Bytes) {
        self.bytes += key.len();
        self.keys.insert(cursor, Bytes::copy_from_slice(key));
        self.order.push_back(cursor);
        while self.order.len() > CURSORS_MAX || self.bytes > CURSOR_BYTES_MAX {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(k) = self.keys.remove(&old) {
                self.bytes -= k.len();
            }
        }
    }

    fn take_number(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

/// Serves one client until it leaves, breaks the protocol, or the node stops.
/// `sentinel`: the connection came to the Sentinel port (`sentinel.rs`):
/// it answers only what a Sentinel does.
pub(super) async fn serve(mut stream: TcpStream, shared: Arc<Shared>, sentinel: bool) {
    let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(STOP_POLL));
    let mut conn = Conn {
        shared: shared.clone(),
        id,
        name: None,
        writes_pending: false,
        level: shared.config.commit_level,
        written: Written::default(),
        last: Default::default(),
        epoch: Default::default(),
        read_after: None,
        local: stream.local_addr().ok(),
        sentinel,
        resp3: false,
        in_refused_multi: false,
        subscribe: Vec::new(),
    };
    match conn.run(&mut stream).await {
        // The client asked for the replication stream: the connection is
        // the upstream side of it from now on.
        Ok(Some((After::Backup, _))) => {
            super::backup::serve(stream, shared).await;
            return;
        }
        Ok(Some((After::Subscribe, rest))) => {
            let first = std::mem::take(&mut conn.subscribe);
            super::sentinel::pubsub(stream, shared, first, conn.resp3, conn.local, rest).await;
            return;
        }
        Ok(Some((_, rest))) => {
            super::replication::serve_downstream(stream, shared, rest).await;
            return;
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(client = id, error = %e, "client connection ended"),
    }
    let _ = stream.close().await;
}

impl Conn {
    /// Once the engine acknowledged a write: waits for the replicas its
    /// level needs, then notes where it landed (for `WAIT`, `CLIENT
    /// RECEIPT` and the session token) and the level it reached.
    fn noted<T: Receipts + 'static>(
        &self,
        answer: crate::engine::Answer<T>,
    ) -> impl Future<Output = Result<T, Failure>> + 'static {
        let (written, last, epoch, shared, asked) = (
            self.written.clone(),
            self.last.clone(),
            self.epoch.clone(),
            self.shared.clone(),
            self.level,
        );
        async move {
            let receipts = answer.await?;
            // Where this write landed, for the replicas to be waited on;
            // built only for the levels that wait (no allocation per write
            // otherwise).
            let reached = if asked.needs_replicas() {
                let mut mine = BTreeMap::new();
                receipts.note(&mut mine);
                if mine.is_empty() {
                    Ok(asked)
                } else {
                    commit::settle(&shared, &mine, asked).await
                }
            } else {
                Ok(asked)
            };
            receipts.note(&mut written.borrow_mut());
            last.set(Some((
                asked,
                reached.as_ref().map_or(Commit::Local, |l| *l),
            )));
            if receipts.epoch() > 0 {
                epoch.set(epoch.get().max(receipts.epoch()));
            }
            match reached {
                Ok(_) => Ok(receipts),
                Err(short) => Err(Failure::Short(short)),
            }
        }
    }

    /// Serves commands; `Some(bytes)` when the client turned the connection
    /// into a replication stream (with what it sent after the command).
    /// `Some` when the connection becomes something else (`After::Stream`
    /// or `After::Backup`), with what it had received past the command.
    async fn run(&mut self, stream: &mut TcpStream) -> std::io::Result<Option<(After, BytesMut)>> {
        let limits = self.shared.config.limits;
        let resp_limits = resp::Limits {
            bulk_bytes_max: limits.bulk_bytes_max,
            args_max: limits.args_max,
            inline_bytes_max: 64 << 10,
        };
        // What a connection holds while idle: the scratch buffer and a small
        // input buffer, which grows only for a client that sends more.
        let mut input = BytesMut::with_capacity(4 << 10);
        let mut scratch = vec![0u8; READ_CHUNK];
        let mut parser = resp::Parser::default();
        let mut out = BytesMut::new();
        let flush_at = limits.reply_buffer_bytes_max.min(1 << 20);
        loop {
            // A client whose commands never wait (PING...) must not keep the
            // shards and other clients of this core from running.
            glommio::yield_if_needed().await;
            let mut slots: Vec<Slot> = Vec::new();
            let mut after = After::Continue;
            while after == After::Continue {
                let frame = match parser.parse(&input, &resp_limits) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => {
                        self.shared
                            .counters
                            .protocol_errors
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(client = self.id, error = %e, "protocol error; closing");
                        slots.push(Slot::Ready(Reply::Error(format!(
                            "ERR Protocol error: {e}"
                        ))));
                        after = After::Close;
                        break;
                    }
                };
                let bytes = input.split_to(frame.consumed).freeze();
                let args = frame.arguments(&bytes);
                if args.is_empty() {
                    continue;
                }
                self.shared
                    .counters
                    .commands
                    .fetch_add(1, Ordering::Relaxed);
                after = self.dispatch(args, &mut slots, &mut out, stream).await?;
            }
            drain(&mut slots, &mut out, stream, flush_at, self.resp3).await?;
            self.writes_pending = false;
            if !out.is_empty() {
                stream.write_all(&out).await?;
                out.clear();
            }
            if after == After::Stream || after == After::Backup || after == After::Subscribe {
                return Ok(Some((after, input)));
            }
            if after == After::Close || self.shared.stopping() {
                return Ok(None);
            }
            if input.len() > limits.query_buffer_bytes_max {
                self.shared
                    .counters
                    .protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                stream
                    .write_all(b"-ERR query buffer limit reached; closing the connection\r\n")
                    .await?;
                return Ok(None);
            }
            // Read more, looking up now and then whether the node stops.
            // Into a buffer zeroed once, then copied: zeroing a fresh chunk
            // of `input` for every read cost more than the command.
            let n = loop {
                match stream.read(&mut scratch).await {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        if self.shared.stopping() {
                            return Ok(None);
                        }
                    }
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                return Ok(None);
            }
            input.extend_from_slice(&scratch[..n]);
        }
    }

    /// Runs one command: its reply goes into `slots`, in order.
    async fn dispatch(
        &mut self,
        args: Vec<Bytes>,
        slots: &mut Vec<Slot>,
        out: &mut BytesMut,
        stream: &mut TcpStream,
    ) -> std::io::Result<After> {
        let flush_at = self
            .shared
            .config
            .limits
            .reply_buffer_bytes_max
            .min(1 << 20);
        let command = Command::of(&args[0]);
        if command == Command::Hello {
            // What came before it is answered in the protocol it was asked
            // in; HELLO's own reply is in the one it asks for.
            drain(slots, out, stream, flush_at, self.resp3).await?;
        }
        if self.sentinel {
            let reply = match command {
                Command::Role => Reply::Array(vec![
                    Reply::bulk("sentinel"),
                    Reply::Array(vec![Reply::bulk(self.shared.config.sentinel_name.clone())]),
                ]),
                Command::Sentinel
                | Command::Ping
                | Command::Echo
                | Command::Quit
                | Command::Client
                | Command::Hello
                | Command::Auth
                | Command::Introspect => return Ok(self.run_command(command, args, slots)),
                Command::Subscribe => {
                    self.subscribe = args;
                    return Ok(After::Subscribe);
                }
                // Clients check a connection is ready with INFO (ioredis).
                Command::Info => Reply::Bulk(Bytes::from(format!(
                    "# Server\r\nredis_version:7.0.0\r\ntidewal_version:{}\r\nredis_mode:sentinel\r\n\r\n# Sentinel\r\nsentinel_masters:1\r\n",
                    env!("CARGO_PKG_VERSION")
                ))),
                _ => Reply::err(format!(
                    "this is tidewal's Sentinel port: it answers SENTINEL, ROLE, SUBSCRIBE, PSUBSCRIBE, INFO, PING, ECHO, HELLO, AUTH, CLIENT, COMMAND and QUIT, not {} (the node's clients connect to {})",
                    String::from_utf8_lossy(&args[0]).to_uppercase(),
                    self.shared.listen
                )),
            };
            slots.push(Slot::Ready(reply));
            return Ok(After::Continue);
        }
        if (self.in_refused_multi || command == Command::Transaction)
            && let Some(reply) = self.refused_transaction(&args)
        {
            slots.push(Slot::Ready(reply));
            return Ok(After::Continue);
        }
        if command.reads() && self.writes_pending {
            // Read after write: the writes before it land first.
            drain(slots, out, stream, flush_at, self.resp3).await?;
            self.writes_pending = false;
        }
        if command.reads_keys() && self.shared.config.warm_standby && self.shared.is_replica() {
            slots.push(Slot::Ready(Reply::Error(format!(
                "STANDBY this node is a warm standby: it replicates and serves no reads (read from {})",
                self.shared.replica_of()
            ))));
            return Ok(After::Continue);
        }
        if command.reads_keys()
            && let Some((token, wait)) = self.read_after.clone()
            && let Err(why) = applied_past(&self.shared, &token, wait).await
        {
            slots.push(Slot::Ready(Reply::Error(why)));
            return Ok(After::Continue);
        }
        let after = self.run_command(command, args, slots);
        if command.writes() {
            self.writes_pending = true;
        }
        if out.len() >= flush_at || command.sends_when_polled() {
            // These ask the engine only when polled: answer them now, so no
            // later command of the pipeline overtakes them.
            drain(slots, out, stream, flush_at, self.resp3).await?;
            self.writes_pending = false;
        }
        Ok(after)
    }

    /// Starts one command: its reply goes into `slots`, in order.
    fn run_command(&mut self, command: Command, args: Vec<Bytes>, slots: &mut Vec<Slot>) -> After {
        let arity_ok = command.arity_ok(args.len());
        if !arity_ok {
            let name = String::from_utf8_lossy(&args[0]).to_lowercase();
            slots.push(Slot::Ready(Reply::err(format!(
                "wrong number of arguments for '{name}' command"
            ))));
            return After::Continue;
        }
        if command.writes() && self.shared.is_replica() {
            let upstream = self.shared.replica_of();
            let primary = if upstream.is_empty() {
                "not known yet: this node stands by for a failover".to_string()
            } else {
                upstream
            };
            slots.push(Slot::Ready(Reply::Error(format!(
                "READONLY You can't write against a read only replica (the primary is {primary})"
            ))));
            return After::Continue;
        }
        let engine = &self.shared.engine;
        let level = self.level;
        let slot = match command {
            Command::Stream => {
                // With the cluster this node belongs to: a downstream of
                // another cluster refuses it, a new one joins it.
                let cluster = u128::from_be_bytes(self.shared.cluster());
                slots.push(Slot::Ready(Reply::Simple(format!("STREAM {cluster:032x}"))));
                return After::Stream;
            }
            Command::Backup => {
                let cluster = u128::from_be_bytes(self.shared.cluster());
                slots.push(Slot::Ready(Reply::Simple(format!(
                    "BACKUP {cluster:032x} {}",
                    self.shared.engine.shard_count()
                ))));
                return After::Backup;
            }
            Command::Ping => Slot::Ready(match args.get(1) {
                Some(message) => Reply::Bulk(message.clone()),
                None => Reply::Simple("PONG".into()),
            }),
            Command::Echo => Slot::Ready(Reply::Bulk(args[1].clone())),
            Command::Quit => {
                slots.push(Slot::Ready(Reply::Ok));
                return After::Close;
            }
            Command::Get => {
                let answer = engine.get(args[1].clone());
                later(async move { Ok(bulk_or_nil(answer.await?)) })
            }
            Command::Set => self.set(args),
            Command::Del => {
                let answers: Vec<_> = args[1..]
                    .iter()
                    .map(|key| {
                        self.noted(
                            engine.update_at(key.clone(), level.engine_level(), |current| {
                                match current {
                                    Some(_) => Update::Delete,
                                    None => Update::Keep,
                                }
                            }),
                        )
                    })
                    .collect();
                later(count_some(answers))
            }
            Command::Exists => {
                let answers: Vec<_> = args[1..].iter().map(|k| engine.get(k.clone())).collect();
                later(count_some(answers))
            }
            Command::Mget => {
                let answers: Vec<_> = args[1..].iter().map(|k| engine.get(k.clone())).collect();
                later(async move {
                    let mut values = Vec::with_capacity(answers.len());
                    for answer in answers {
                        values.push(bulk_or_nil(answer.await?));
                    }
                    Ok(Reply::Array(values))
                })
            }
            Command::Mset => {
                if args.len().is_multiple_of(2) {
                    Slot::Ready(Reply::err("wrong number of arguments for 'mset' command"))
                } else {
                    let ops = args[1..]
                        .chunks(2)
                        .map(|kv| BatchOp::Put(kv[0].clone(), kv[1].clone()))
                        .collect();
                    let answer = self.noted(engine.batch_at(
                        ops,
                        BatchAtomicity::PerShard,
                        level.engine_level(),
                    ));
                    later(async move { answer.await.map(|_| Reply::Ok) })
                }
            }
            Command::Incr | Command::Decr | Command::IncrBy | Command::DecrBy => {
                let delta = match command {
                    Command::Incr => Some(1),
                    Command::Decr => Some(-1),
                    Command::IncrBy => parse_i64(&args[2]),
                    _ => parse_i64(&args[2]).and_then(i64::checked_neg),
                };
                match delta {
                    None => Slot::Ready(Reply::err("value is not an integer or out of range")),
                    Some(delta) => self.incr(args[1].clone(), delta),
                }
            }
            Command::Scan => self.scan(&args),
            Command::Keys if args[1].len() > PATTERN_BYTES_MAX => {
                Slot::Ready(Reply::err(PATTERN_TOO_LONG))
            }
            Command::Keys => {
                let pattern = args[1].clone();
                let answer = scan_matching(self.shared.clone(), pattern, usize::MAX);
                later(async move {
                    let (keys, _) = answer.await?;
                    Ok(Reply::Array(keys.into_iter().map(Reply::Bulk).collect()))
                })
            }
            Command::DbSize => {
                let shared = self.shared.clone();
                later(async move {
                    let stats = shared.engine.stats().await?;
                    Ok(Reply::Int(stats.iter().map(|s| s.keys as i64).sum()))
                })
            }
            Command::Info => {
                let shared = self.shared.clone();
                let section = args
                    .get(1)
                    .map(|s| String::from_utf8_lossy(s).to_lowercase());
                later(async move {
                    let text = super::info::render(&shared, section.as_deref()).await?;
                    Ok(Reply::Bulk(text.into()))
                })
            }
            Command::Role => {
                let shared = self.shared.clone();
                later(async move {
                    let stats = shared.engine.stats().await?;
                    // Redis's offset is one number: the sum of the shards'
                    // LSNs plays its part.
                    let offset: u64 = stats.iter().map(|s| s.next_lsn).sum();
                    Ok(super::replication::role(&shared, offset))
                })
            }
            Command::Wait => self.wait(&args),
            Command::Replicaof => self.replicaof(&args),
            Command::Vote => {
                Slot::Later(Box::pin(super::failover::vote(self.shared.clone(), args)))
            }
            Command::Who => Slot::Later(Box::pin(super::failover::who(self.shared.clone()))),
            Command::Cut => Slot::Later(Box::pin(super::backup::cut_command(
                self.shared.clone(),
                args,
            ))),
            Command::Auth => Slot::Ready(auth(&args[1..])),
            Command::Replicas => Slot::Ready(super::replication::readable_replicas(&self.shared)),
            Command::Subscribe => Slot::Ready(Reply::err(
                "pub/sub is not supported; a node's Sentinel port (--sentinel) publishes +switch-master",
            )),
            // Answered by `refused_transaction` before it gets here.
            Command::Transaction => Slot::Ready(Reply::err("transactions are not supported")),
            Command::Sentinel if !self.sentinel => Slot::Ready(Reply::err(
                "SENTINEL is answered on the node's Sentinel port (tidewal node --sentinel HOST:PORT)",
            )),
            Command::Sentinel => Slot::Later(Box::pin(super::sentinel::command(
                self.shared.clone(),
                args,
                self.local,
            ))),
            Command::Fetch => {
                Slot::Later(Box::pin(super::failover::fetch(self.shared.clone(), args)))
            }
            Command::Peers => Slot::Later(Box::pin(super::failover::peers_command(
                self.shared.clone(),
                args,
            ))),
            Command::Config => config_command(&self.shared, &args),
            Command::Introspect => Slot::Ready(match args.get(1).map(|a| a.to_ascii_uppercase()) {
                Some(sub) if sub == b"COUNT" => Reply::Int(Command::ALL.len() as i64),
                // COMMAND, COMMAND DOCS, COMMAND INFO: nothing to say; tools
                // such as redis-cli take an empty answer.
                _ => Reply::Array(Vec::new()),
            }),
            Command::Client => self.client(&args),
            Command::Select => Slot::Ready(match parse_i64(&args[1]) {
                Some(0) => Reply::Ok,
                _ => Reply::err("DB index is out of range (tidewal has one database, 0)"),
            }),
            Command::Hello => Slot::Ready(self.hello(&args)),
            Command::Unknown => {
                let rest: Vec<String> = args[1..]
                    .iter()
                    .take(3)
                    .map(|a| format!("'{}'", shown(a)))
                    .collect();
                Slot::Ready(Reply::err(format!(
                    "unknown command '{}', with args beginning with: {}",
                    shown(&args[0]),
                    rest.join(" ")
                )))
            }
        };
        slots.push(slot);
        After::Continue
    }

    /// `SET key value [NX|XX]`: other options are refused by name.
    fn set(&self, args: Vec<Bytes>) -> Slot {
        let engine = &self.shared.engine;
        let level = self.level;
        let (mut nx, mut xx) = (false, false);
        for option in &args[3..] {
            match option.to_ascii_uppercase().as_slice() {
                b"NX" => nx = true,
                b"XX" => xx = true,
                b"EX" | b"PX" | b"EXAT" | b"PXAT" | b"KEEPTTL" => {
                    return Slot::Ready(Reply::err(format!(
                        "SET option '{}' is not supported: tidewal keys do not expire",
                        shown(option)
                    )));
                }
                b"GET" => {
                    return Slot::Ready(Reply::err("SET option 'GET' is not supported"));
                }
                _ => return Slot::Ready(Reply::err("syntax error")),
            }
        }
        if nx && xx {
            return Slot::Ready(Reply::err("syntax error"));
        }
        let (key, value) = (args[1].clone(), args[2].clone());
        if !nx && !xx {
            let answer = self.noted(engine.put_at(key, value, level.engine_level()));
            return later(async move { answer.await.map(|_| Reply::Ok) });
        }
        let answer = self.noted(engine.update_at(key, level.engine_level(), move |current| {
            if current.is_some() == xx {
                Update::Put(value)
            } else {
                Update::Keep
            }
        }));
        later(async move {
            Ok(match answer.await? {
                Some(_) => Reply::Ok,
                None => Reply::Nil,
            })
        })
    }

    /// `INCR` and friends: one atomic read-modify-write on the key's shard.
    fn incr(&self, key: Bytes, delta: i64) -> Slot {
        let engine = &self.shared.engine;
        let (tx, rx) = futures_channel::oneshot::channel::<Result<i64, &'static str>>();
        let answer = self.noted(
            engine.update_at(key, self.level.engine_level(), move |current| {
                let old = match current {
                    None => Some(0),
                    Some(v) => parse_i64(v),
                };
                let result = match old {
                    None => Err("value is not an integer or out of range"),
                    Some(old) => old
                        .checked_add(delta)
                        .ok_or("increment or decrement would overflow"),
                };
                let update = match result {
                    Ok(new) => Update::Put(Bytes::from(new.to_string())),
                    Err(_) => Update::Keep,
                };
                let _ = tx.send(result);
                update
            }),
        );
        later(async move {
            answer.await?;
            Ok(match rx.await {
                Ok(Ok(value)) => Reply::Int(value),
                Ok(Err(why)) => Reply::err(why),
                Err(_) => Reply::err("the update did not run"),
            })
        })
    }

    /// `SCAN cursor [MATCH pattern] [COUNT n] [TYPE t]`. Keys come in key
    /// order; the cursor stands for the last key returned, so every key
    /// present from the start to the end of an iteration is returned once.
    fn scan(&mut self, args: &[Bytes]) -> Slot {
        let Some(cursor) = std::str::from_utf8(&args[1])
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return Slot::Ready(Reply::err("invalid cursor"));
        };
        let (mut pattern, mut count, mut strings) = (Bytes::from_static(b"*"), 10usize, true);
        let mut rest = args[2..].iter();
        while let Some(option) = rest.next() {
            let Some(value) = rest.next() else {
                return Slot::Ready(Reply::err("syntax error"));
            };
            match option.to_ascii_uppercase().as_slice() {
                b"MATCH" if value.len() > PATTERN_BYTES_MAX => {
                    return Slot::Ready(Reply::err(PATTERN_TOO_LONG));
                }
                b"MATCH" => pattern = value.clone(),
                b"COUNT" => match parse_i64(value) {
                    Some(n) if n >= 1 => count = n.min(100_000) as usize,
                    _ => return Slot::Ready(Reply::err("value is not an integer or out of range")),
                },
                b"TYPE" => strings = value.eq_ignore_ascii_case(b"string"),
                _ => return Slot::Ready(Reply::err("syntax error")),
            }
        }
        let after = if cursor == 0 {
            None
        } else {
            let known = self
                .shared
                .cursors
                .lock()
                .ok()
                .and_then(|c| c.keys.get(&cursor).cloned());
            match known {
                Some(key) => Some(key.clone()),
                None => {
                    return Slot::Ready(Reply::err(
                        "invalid cursor (unknown, or evicted: the node keeps the newest 65536)",
                    ));
                }
            }
        };
        if !strings {
            // Every tidewal value is a string.
            return Slot::Ready(Reply::Array(vec![
                Reply::bulk("0"),
                Reply::Array(Vec::new()),
            ]));
        }
        let shared = self.shared.clone();
        let engine = self.shared.engine.clone();
        let prefix = Bytes::copy_from_slice(glob::literal_prefix(&pattern));
        let start = match after {
            // The smallest key after the last one returned.
            Some(last) if last.as_ref() >= prefix.as_ref() => {
                let mut k = last.to_vec();
                k.push(0);
                Bytes::from(k)
            }
            _ => prefix.clone(),
        };
        let answer = engine.scan(start, prefix_end(&prefix), count);
        later(async move {
            let entries = answer.await?;
            let done = entries.len() < count;
            let last = entries.last().map(|(k, _)| k.clone());
            let keys: Vec<Reply> = entries
                .into_iter()
                .filter(|(k, _)| glob::matches(&pattern, k))
                .map(|(k, _)| Reply::Bulk(k))
                .collect();
            let cursor = match (done, last) {
                (false, Some(last)) => match shared.cursors.lock() {
                    Ok(mut cursors) => {
                        let next = cursors.take_number();
                        cursors.file(next, &last);
                        next
                    }
                    Err(_) => 0,
                },
                _ => 0,
            };
            Ok(Reply::Array(vec![
                Reply::Bulk(cursor.to_string().into()),
                Reply::Array(keys),
            ]))
        })
    }

    /// `WAIT numreplicas timeout`, as in Redis: waits until `numreplicas`
    /// replicas have made durable every write this connection had
    /// acknowledged (or the timeout in milliseconds passes; 0 waits for
    /// ever), and answers how many have.
    fn wait(&self, args: &[Bytes]) -> Slot {
        let (Some(replicas), Some(timeout)) = (parse_i64(&args[1]), parse_i64(&args[2])) else {
            return Slot::Ready(Reply::err("value is not an integer or out of range"));
        };
        if timeout < 0 {
            return Slot::Ready(Reply::err("timeout is negative"));
        }
        let shared = self.shared.clone();
        let written = self.written.borrow().clone();
        later(async move {
            if replicas > 0 && !written.is_empty() {
                let want = Commit::Replicated(u32::try_from(replicas).unwrap_or(u32::MAX));
                let limit = (timeout > 0).then(|| Duration::from_millis(timeout as u64));
                let _ = commit::replicas_reached(&shared, &written, want, limit).await;
            }
            Ok(Reply::Int(commit::replicas_having(&shared, &written) as i64))
        })
    }

    /// `REPLICAOF host port` follows another node from now on (this node's
    /// log must continue the upstream's, or it is refused and kept as it
    /// is); `REPLICAOF NO ONE` makes a replica a primary: it stops
    /// following, starts a new epoch (so records of the old primary are
    /// refused from then on) and takes writes.
    fn replicaof(&self, args: &[Bytes]) -> Slot {
        let shared = self.shared.clone();
        let no_one = args[1].eq_ignore_ascii_case(b"NO") && args[2].eq_ignore_ascii_case(b"ONE");
        if no_one {
            return later(async move {
                if !shared.is_replica() {
                    return Ok(Reply::Ok);
                }
                // Stop following first, then start the new epoch, and only
                // then take writes: none is written in the old epoch.
                shared.follow_generation.fetch_add(1, Ordering::AcqRel);
                super::failover::before_promotion(&shared).await?;
                let epoch = shared.engine.begin_epoch().await?;
                shared.set_upstream("");
                tracing::warn!(epoch, "promoted to primary by REPLICAOF NO ONE");
                super::failover::on_promote(&shared, epoch, "replicaof");
                Ok(Reply::Ok)
            });
        }
        let host = String::from_utf8_lossy(&args[1]).to_string();
        let Some(port) = parse_i64(&args[2]).filter(|p| (1..=65535).contains(p)) else {
            return Slot::Ready(Reply::err("Invalid master port"));
        };
        // An IPv6 address is written in brackets before its port.
        let upstream = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        if super::failover::is_own_address(&shared, &upstream) {
            return Slot::Ready(Reply::err("a node cannot replicate from itself"));
        }
        if shared.replica_of() == upstream {
            let refused = shared.upstream.lock().is_ok_and(|u| {
                u.last_error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("refused"))
            });
            if refused {
                // Refused (diverged): asking again re-syncs it from a
                // snapshot, keeping its old log aside.
                return Slot::Ready(match shared.resync() {
                    Ok(_) => Reply::Simple("OK re-syncing from a snapshot".into()),
                    Err(why) => Reply::err(why),
                });
            }
            return Slot::Ready(Reply::Simple(
                "OK Already connected to specified master".into(),
            ));
        }
        later(async move {
            // A node with no data is about to join the upstream's cluster:
            // until it has, it belongs to none (so that a replica of it does
            // not adopt the id it is leaving).
            let stats = shared.engine.stats().await?;
            if stats.iter().all(|s| s.next_lsn == 0) {
                shared.leave_cluster();
            }
            let generation = shared.set_upstream(&upstream);
            tracing::warn!(%upstream, "following a new upstream (REPLICAOF)");
            glommio::spawn_local(super::replication::follow(shared, upstream, generation)).detach();
            Ok(Reply::Ok)
        })
    }

    /// Transactions are refused, and so is what a client sends inside
    /// one: after a refused MULTI, every command up to EXEC or DISCARD is
    /// answered with an error and not run (a client would take a partly
    /// run transaction for one not run at all, and try it again), and
    /// EXEC with EXECABORT, which clients read as "nothing was done".
    /// `None`: the command is not part of one.
    fn refused_transaction(&mut self, args: &[Bytes]) -> Option<Reply> {
        let name = args[0].to_ascii_uppercase();
        let why = "tidewal has no transactions (keys live in shards of their own, so MULTI/EXEC over several could not be atomic); send the commands as a plain pipeline (redis-py: pipeline(transaction=False))";
        if !self.in_refused_multi {
            return match name.as_slice() {
                b"MULTI" if args.len() > 1 => {
                    Some(Reply::err("wrong number of arguments for 'multi' command"))
                }
                b"MULTI" => {
                    self.in_refused_multi = true;
                    Some(Reply::err(format!(
                        "MULTI is not supported, and no command will be run up to its EXEC or DISCARD: {why}"
                    )))
                }
                b"EXEC" => Some(Reply::err("EXEC without MULTI")),
                b"DISCARD" => Some(Reply::err("DISCARD without MULTI")),
                b"WATCH" | b"UNWATCH" => Some(Reply::err(format!(
                    "{} is not supported: {why}",
                    shown(&name)
                ))),
                _ => None,
            };
        }
        Some(match name.as_slice() {
            // As in Redis, QUIT is never part of a transaction.
            b"QUIT" => return None,
            b"EXEC" => {
                self.in_refused_multi = false;
                Reply::Error(format!(
                    "EXECABORT Transaction discarded because of previous errors: {why}"
                ))
            }
            b"DISCARD" => {
                self.in_refused_multi = false;
                Reply::Ok
            }
            _ => Reply::err(format!(
                "{} not run: it came inside a MULTI, which was refused ({why})",
                shown(&name)
            )),
        })
    }

    /// `HELLO [protover [AUTH username password] [SETNAME name]]`: moves
    /// the connection to RESP2 or RESP3 (its replies from this one on) and
    /// describes the server. tidewal has no passwords: AUTH is taken as
    /// Redis without one takes it (see [`auth`]).
    fn hello(&mut self, args: &[Bytes]) -> Reply {
        let mut resp3 = self.resp3;
        if let Some(version) = args.get(1) {
            match parse_i64(version) {
                Some(2) => resp3 = false,
                Some(3) => resp3 = true,
                _ => {
                    return Reply::Error(
                        "NOPROTO unsupported protocol version (tidewal speaks RESP2 and RESP3)"
                            .into(),
                    );
                }
            }
        }
        let mut name = None;
        let mut i = 2;
        while i < args.len() {
            match args[i].to_ascii_uppercase().as_slice() {
                b"SETNAME" if i + 1 < args.len() => {
                    match client_name(&args[i + 1]) {
                        Ok(n) => name = Some(n),
                        Err(e) => return e,
                    }
                    i += 2;
                }
                b"AUTH" if i + 2 < args.len() => {
                    if let Reply::Error(e) = auth(&args[i + 1..i + 3]) {
                        return Reply::Error(e);
                    }
                    i += 3;
                }
                _ => {
                    return Reply::err(format!(
                        "syntax error in HELLO option '{}'",
                        shown(&args[i])
                    ));
                }
            }
        }
        self.resp3 = resp3;
        if let Some(name) = name {
            self.name = name;
        }
        let role = if self.shared.is_replica() {
            "replica"
        } else {
            "master"
        };
        Reply::Map(vec![
            (Reply::bulk("server"), Reply::bulk("tidewal")),
            (
                Reply::bulk("version"),
                Reply::bulk(env!("CARGO_PKG_VERSION")),
            ),
            (Reply::bulk("proto"), Reply::Int(if resp3 { 3 } else { 2 })),
            (Reply::bulk("id"), Reply::Int(self.id as i64)),
            (
                Reply::bulk("mode"),
                Reply::bulk(if self.sentinel {
                    "sentinel"
                } else {
                    "standalone"
                }),
            ),
            (Reply::bulk("role"), Reply::bulk(role)),
            (Reply::bulk("modules"), Reply::Array(Vec::new())),
        ])
    }

    fn client(&mut self, args: &[Bytes]) -> Slot {
        let sub = args
            .get(1)
            .map(|s| s.to_ascii_uppercase())
            .unwrap_or_default();
        Slot::Ready(match sub.as_slice() {
            b"SETNAME" if args.len() == 3 => match client_name(&args[2]) {
                Ok(name) => {
                    self.name = name;
                    Reply::Ok
                }
                Err(e) => e,
            },
            b"GETNAME" => self.name.clone().map_or(Reply::Nil, Reply::Bulk),
            b"ID" => Reply::Int(self.id as i64),
            // Client libraries announce themselves; nothing to do with it.
            b"SETINFO" => Reply::Ok,
            b"COMMIT-LEVEL" if args.len() == 2 => Reply::bulk(self.level.to_string()),
            b"COMMIT-LEVEL" if args.len() == 3 => {
                match String::from_utf8_lossy(&args[2]).parse::<Commit>() {
                    Ok(level) if level.needs_replicas() && self.shared.is_replica() => Reply::err(
                        format!("commit level {level} is for a primary; this node is a replica"),
                    ),
                    Ok(level) => {
                        self.level = level;
                        Reply::Ok
                    }
                    Err(e) => Reply::err(e),
                }
            }
            // The last acknowledged write: the level asked, the level
            // reached, and the session token of this connection's writes.
            b"RECEIPT" if args.len() == 2 => match self.last.get() {
                None => Reply::Nil,
                Some((asked, reached)) => Reply::Array(vec![
                    Reply::bulk(asked.to_string()),
                    Reply::bulk(reached.to_string()),
                    Reply::bulk(
                        Token {
                            epoch: self.epoch.get(),
                            lsns: self.written.borrow().clone(),
                        }
                        .render(),
                    ),
                ]),
            },
            // Reads from now on wait until this node applied the writes of
            // the token (read your writes on a replica).
            b"READ-AFTER" if args.len() == 3 || args.len() == 4 => {
                let wait = match args.get(3).map(|t| parse_i64(t)) {
                    None => Some(1000),
                    Some(Some(ms)) if ms >= 0 => Some(ms),
                    Some(_) => None,
                };
                match (Token::parse(&args[2]), wait) {
                    (_, None) => Reply::err("timeout is not a non-negative integer"),
                    (None, _) => Reply::err(
                        "invalid session token: expected EPOCH/SHARD:LSN,... as CLIENT RECEIPT gives",
                    ),
                    (Some(token), Some(ms)) => {
                        self.read_after = if token.lsns.is_empty() {
                            None
                        } else {
                            Some((token, Duration::from_millis(ms as u64)))
                        };
                        Reply::Ok
                    }
                }
            }
            _ => Reply::err(format!("CLIENT {} is not supported", shown(&sub))),
        })
    }
}

/// `AUTH [username] password`, as Redis answers it with no password set
/// (its default user is `nopass`): the user `default` with any password
/// is taken; a password alone is refused, as Redis refuses it; any other
/// user is not known.
fn auth(args: &[Bytes]) -> Reply {
    match args {
        [user, _] if user.as_ref() == b"default" => Reply::Ok,
        [_, _] => {
            Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into())
        }
        _ => Reply::err(
            "AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        ),
    }
}

/// A client name as Redis takes one: `None` (no name) for an empty one;
/// refused with spaces, newlines or other characters outside `!`..`~`. A
/// copy: a slice would pin the whole input buffer.
fn client_name(name: &[u8]) -> Result<Option<Bytes>, Reply> {
    if name.iter().any(|b| !(b'!'..=b'~').contains(b)) {
        return Err(Reply::err(
            "Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    Ok((!name.is_empty()).then(|| Bytes::copy_from_slice(name)))
}

/// Awaits every reply in order and encodes them, writing out whenever
/// `flush_at` bytes are waiting.
async fn drain(
    slots: &mut Vec<Slot>,
    out: &mut BytesMut,
    stream: &mut TcpStream,
    flush_at: usize,
    resp3: bool,
) -> std::io::Result<()> {
    for slot in slots.drain(..) {
        let reply = match slot {
            Slot::Ready(reply) => reply,
            Slot::Later(later) => later.await,
        };
        // An array (MGET, KEYS, SCAN) goes out element by element: its values
        // are shared with the state, and only their encoding is copied, at
        // most `flush_at` bytes of it at a time.
        match reply {
            Reply::Array(items) => {
                resp::encode_array_header(items.len(), out);
                for item in items {
                    item.encode_as(out, resp3);
                    if out.len() >= flush_at {
                        stream.write_all(out).await?;
                        out.clear();
                    }
                }
            }
            reply => reply.encode_as(out, resp3),
        }
        if out.len() >= flush_at {
            stream.write_all(out).await?;
            out.clear();
        }
    }
    Ok(())
}

fn later(f: impl Future<Output = Result<Reply, Failure>> + 'static) -> Slot {
    Slot::Later(Box::pin(async move {
        match f.await {
            Ok(reply) => reply,
            Err(Failure::Engine(e)) => engine_error(e),
            Err(Failure::Short(short)) => Reply::Error(short.to_string()),
        }
    }))
}

fn engine_error(e: EngineError) -> Reply {
    use crate::wal::WalError;
    match e {
        EngineError::Closed | EngineError::Wal(WalError::Closed) => {
            Reply::err("the node is shutting down")
        }
        EngineError::Wal(WalError::TooLarge { len, max }) => Reply::err(format!(
            "the write is too large: {len} bytes for one shard, over the limit of {max}"
        )),
        EngineError::Wal(e @ WalError::Failed(_)) => Reply::err(format!(
            "write failed and its durability is unknown; the shard stopped taking writes: {e}"
        )),
        EngineError::Wal(e) => Reply::err(e),
        other => Reply::err(other),
    }
}

/// Client bytes quoted in an error: at most 64, lossily as text (cut as
/// bytes before decoding, never inside a character).
fn shown(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&bytes[..bytes.len().min(64)])
}

/// Waits, up to `wait`, until this node has applied every write of
/// `token` (read your writes on a replica); `Err` with a `-TRYAGAIN` text
/// when it has not in time.
async fn applied_past(shared: &Shared, token: &Token, wait: Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let stats = shared
            .engine
            .stats()
            .await
            .map_err(|e| format!("ERR {e}"))?;
        let epoch = stats.iter().map(|s| s.epoch).max().unwrap_or(0);
        let missing = token.lsns.iter().find(|(shard, lsn)| {
            stats
                .get(**shard as usize)
                .is_none_or(|s| s.next_lsn <= **lsn)
        });
        let missing = match missing {
            Some((shard, lsn)) => Some(format!(
                "shard {shard} has applied up to {}, the session wrote at {lsn}",
                stats.get(*shard as usize).map_or(0, |s| s.next_lsn)
            )),
            None if epoch < token.epoch => Some(format!(
                "this node is in epoch {epoch}, the session wrote in epoch {}",
                token.epoch
            )),
            None => None,
        };
        let Some(why) = missing else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || shared.stopping() {
            return Err(format!(
                "TRYAGAIN this node has not applied the session's writes within {} ms: {why}",
                wait.as_millis()
            ));
        }
        // Woken when the replica acks a batch (it has applied it), or soon.
        let _ = glommio::timer::timeout(left.min(Duration::from_millis(20)), async {
            super::commit::next_ack(shared).await;
            Ok(())
        })
        .await;
    }
}

/// How many of the answers are `Some`: DEL's deleted keys, EXISTS's
/// present ones.
async fn count_some<T, E: Into<Failure>>(
    answers: Vec<impl Future<Output = Result<Option<T>, E>>>,
) -> Result<Reply, Failure> {
    let mut n = 0;
    for answer in answers {
        n += i64::from(answer.await.map_err(Into::into)?.is_some());
    }
    Ok(Reply::Int(n))
}

fn bulk_or_nil(value: Option<Bytes>) -> Reply {
    value.map_or(Reply::Nil, Reply::Bulk)
}

/// A decimal i64 as Redis accepts it (no spaces, no `+`, no leading zeros).
pub(super) fn parse_i64(bytes: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(bytes).ok()?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty()
        || (digits.len() > 1 && digits.starts_with('0'))
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

/// The first key after every key starting with `prefix` (`None`: no end).
fn prefix_end(prefix: &[u8]) -> Option<Bytes> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(Bytes::from(end));
        }
    }
    None
}

/// Every key matching `pattern`, up to `limit` (for `KEYS`), in key order.
async fn scan_matching(
    shared: Arc<Shared>,
    pattern: Bytes,
    limit: usize,
) -> Result<(Vec<Bytes>, bool), EngineError> {
    {
        let prefix = Bytes::copy_from_slice(glob::literal_prefix(&pattern));
        let end = prefix_end(&prefix);
        let mut start = prefix.clone();
        let mut keys = Vec::new();
        const PAGE: usize = 4096;
        loop {
            let page = shared.engine.scan(start.clone(), end.clone(), PAGE).await?;
            let full = page.len() == PAGE;
            if let Some((last, _)) = page.last() {
                let mut k = last.to_vec();
                k.push(0);
                start = Bytes::from(k);
            }
            keys.extend(
                page.into_iter()
                    .map(|(k, _)| k)
                    .filter(|k| glob::matches(&pattern, k)),
            );
            if !full || keys.len() >= limit {
                let more = full;
                keys.truncate(limit);
                return Ok((keys, more));
            }
        }
    }
}

/// `CONFIG GET pattern`: a few parameters, answered so tools stay quiet.
fn config_command(shared: &Shared, args: &[Bytes]) -> Slot {
    let sub = args[1].to_ascii_uppercase();
    if sub != b"GET" {
        return Slot::Ready(Reply::err(format!(
            "CONFIG {} is not supported; configure tidewal with its TOML file or flags",
            shown(&sub)
        )));
    }
    let level = shared.config.commit_level;
    let params: [(&str, String); 6] = [
        ("appendonly", "yes".into()),
        (
            "appendfsync",
            match level {
                Commit::Memory => "no".into(),
                _ => "always".into(),
            },
        ),
        ("save", String::new()),
        ("databases", "1".into()),
        (
            "maxclients",
            shared.config.limits.connections_max.to_string(),
        ),
        (
            "proto-max-bulk-len",
            shared.config.limits.bulk_bytes_max.to_string(),
        ),
    ];
    let mut reply = Vec::new();
    for pattern in &args[2..] {
        let pattern = pattern.to_ascii_lowercase();
        for (name, value) in &params {
            if glob::matches(&pattern, name.as_bytes()) {
                reply.push((Reply::bulk(*name), Reply::Bulk(value.clone().into())));
            }
        }
    }
    Slot::Ready(Reply::Map(reply))
}

/// The commands tidewal knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Ping,
    Echo,
    Quit,
    Get,
    Set,
    Del,
    Exists,
    Mget,
    Mset,
    Incr,
    Decr,
    IncrBy,
    DecrBy,
    Scan,
    Keys,
    DbSize,
    Info,
    Role,
    Wait,
    Config,
    Introspect,
    Client,
    Select,
    Hello,
    /// `REPLICAOF host port`, `REPLICAOF NO ONE` (and `SLAVEOF`).
    Replicaof,
    /// `TIDEWAL.STREAM`: a replica asks for the WAL stream.
    Stream,
    /// `TIDEWAL.BACKUP`: a backup of every shard (`backup.rs`).
    Backup,
    /// `TIDEWAL.VOTE`, `TIDEWAL.WHO`, `TIDEWAL.FETCH`: what nodes ask each
    /// other in an election (`failover.rs`).
    Vote,
    Who,
    Fetch,
    /// `TIDEWAL.CUT`: a consistent cut of the primary's logs (backups).
    Cut,
    /// Redis Sentinel's discovery commands (`sentinel.rs`).
    Sentinel,
    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH: refused, saying why (a
    /// transaction over keys of several shards could not be atomic).
    Transaction,
    Auth,
    /// SUBSCRIBE, PSUBSCRIBE: on the Sentinel port only (`+switch-master`).
    Subscribe,
    /// `TIDEWAL.REPLICAS`: the replicas that serve reads (`sentinel.rs`).
    Replicas,
    /// `TIDEWAL.PEERS [HOST:PORT ...]`: the failover peers.
    Peers,
    Unknown,
}

impl Command {
    const ALL: [(&'static [u8], Command); 43] = [
        (super::replication::STREAM_COMMAND, Command::Stream),
        (super::backup::BACKUP_COMMAND, Command::Backup),
        (super::backup::CUT_COMMAND, Command::Cut),
        (super::sentinel::SENTINEL_COMMAND, Command::Sentinel),
        (b"MULTI", Command::Transaction),
        (b"EXEC", Command::Transaction),
        (b"DISCARD", Command::Transaction),
        (b"WATCH", Command::Transaction),
        (b"UNWATCH", Command::Transaction),
        (b"AUTH", Command::Auth),
        (super::replication::REPLICAS_COMMAND, Command::Replicas),
        (b"SUBSCRIBE", Command::Subscribe),
        (b"PSUBSCRIBE", Command::Subscribe),
        (super::failover::VOTE_COMMAND, Command::Vote),
        (super::failover::WHO_COMMAND, Command::Who),
        (super::failover::FETCH_COMMAND, Command::Fetch),
        (super::failover::PEERS_COMMAND, Command::Peers),
        (b"PING", Command::Ping),
        (b"ECHO", Command::Echo),
        (b"QUIT", Command::Quit),
        (b"GET", Command::Get),
        (b"SET", Command::Set),
        (b"DEL", Command::Del),
        (b"EXISTS", Command::Exists),
        (b"MGET", Command::Mget),
        (b"MSET", Command::Mset),
        (b"INCR", Command::Incr),
        (b"DECR", Command::Decr),
        (b"INCRBY", Command::IncrBy),
        (b"DECRBY", Command::DecrBy),
        (b"SCAN", Command::Scan),
        (b"KEYS", Command::Keys),
        (b"DBSIZE", Command::DbSize),
        (b"INFO", Command::Info),
        (b"ROLE", Command::Role),
        (b"WAIT", Command::Wait),
        (b"CONFIG", Command::Config),
        (b"COMMAND", Command::Introspect),
        (b"CLIENT", Command::Client),
        (b"SELECT", Command::Select),
        (b"HELLO", Command::Hello),
        (b"REPLICAOF", Command::Replicaof),
        (b"SLAVEOF", Command::Replicaof),
    ];

    /// The command named `name`, in any case (no allocation per command).
    fn of(name: &[u8]) -> Command {
        Self::ALL
            .iter()
            .find(|(known, _)| known.eq_ignore_ascii_case(name))
            .map_or(Command::Unknown, |(_, c)| *c)
    }

    /// Whether it changes state.
    fn writes(self) -> bool {
        matches!(
            self,
            Command::Set
                | Command::Del
                | Command::Mset
                | Command::Incr
                | Command::Decr
                | Command::IncrBy
                | Command::DecrBy
        )
    }

    /// Whether its engine requests go out only when its reply is polled.
    fn sends_when_polled(self) -> bool {
        matches!(
            self,
            Command::Keys | Command::DbSize | Command::Info | Command::Role
        )
    }

    /// Whether it reads keys (and so waits for a `CLIENT READ-AFTER` token).
    fn reads_keys(self) -> bool {
        matches!(
            self,
            Command::Get
                | Command::Exists
                | Command::Mget
                | Command::Scan
                | Command::Keys
                | Command::DbSize
        )
    }

    /// Whether it reads state (and so must see this client's earlier writes).
    fn reads(self) -> bool {
        !self.writes() && !matches!(self, Command::Ping | Command::Echo)
    }

    /// Redis's arity: exact `n`, or at least `n` when negative.
    fn arity_ok(self, args: usize) -> bool {
        let arity: i32 = match self {
            Command::Ping => -1,
            Command::Echo => 2,
            Command::Quit => -1,
            Command::Get => 2,
            Command::Set => -3,
            Command::Del | Command::Exists | Command::Mget => -2,
            Command::Mset => -3,
            Command::Incr | Command::Decr => 2,
            Command::IncrBy | Command::DecrBy => 3,
            Command::Scan => -2,
            Command::Keys => 2,
            Command::DbSize => 1,
            Command::Info => -1,
            Command::Role => 1,
            Command::Wait => 3,
            Command::Config => -2,
            Command::Introspect => -1,
            Command::Client => -2,
            Command::Select => 2,
            Command::Hello => -1,
            Command::Replicaof => 3,
            Command::Stream => 1,
            Command::Backup => 1,
            Command::Vote => -4,
            Command::Who => 1,
            Command::Cut => -1,
            Command::Sentinel => -2,
            Command::Transaction => -1,
            Command::Auth => -2,
            Command::Subscribe => -2,
            Command::Replicas => 1,
            Command::Fetch => 5,
            Command::Peers => -1,
            Command::Unknown => -1,
        };
        if arity >= 0 {
            args == arity as usize
        } else {
            args >= (-arity) as usize
        }
    }
}
