//! `SENTINEL`: every node can answer the Redis Sentinel commands that
//! Sentinel-aware clients use to find the primary and its replicas
//! (`MASTERS`, `MASTER`, `GET-MASTER-ADDR-BY-NAME`, `REPLICAS`/`SLAVES`).
//! Given every node's Sentinel address, such a client finds the primary
//! again after a failover without a line of tidewal-specific code: the
//! spec's "applications reconnect seamlessly". Tested with redis-rs's
//! `SentinelClient` (`tests/failover.rs`) and redis-py's `Sentinel`.
//!
//! It answers on a port of its own (`--sentinel`), as a Sentinel does:
//! there `ROLE` says `sentinel` (clients check), and nothing else of the
//! node's is served.
//!
//! A node finds the primary by walking up: itself if it is the primary,
//! else its upstream, asked `TIDEWAL.WHO`, and that one's upstream, up to
//! [`HOPS_MAX`] nodes. A primary that does not answer is reported with the
//! flags `master,s_down,o_down`, which clients skip (they ask the next
//! node; during an election no node names a live primary for a second or
//! two). The replicas are the primary's `TIDEWAL.REPLICAS` answer (its
//! `ROLE` list without warm standbys, which serve no reads). Only the cluster's
//! own name (`sentinel_name`, default `tidewal`) is known; `SENTINELS`
//! lists none (clients are given every node's Sentinel port). A
//! connection that subscribes is sent Sentinel's `+switch-master` when the
//! primary it finds changes ([`pubsub`]), for clients that wait for it
//! rather than ask again (Jedis).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::Shared;
use super::resp::Reply;

pub(super) const SENTINEL_COMMAND: &[u8] = b"SENTINEL";

/// Most nodes walked up a cascade to its primary.
const HOPS_MAX: usize = 8;

/// How long each node on the way may take to answer.
const ASK: Duration = Duration::from_secs(1);

/// How long a replica reuses the primary it found (a burst of clients
/// asking after a failover costs one walk, not one each).
const WALK_CACHED: Duration = Duration::from_millis(250);

/// The primary, as this node found it.
struct Primary {
    /// `HOST:PORT` of its client port.
    addr: String,
    /// It answered as the primary.
    up: bool,
}

/// `SENTINEL subcommand [name]`. `local`: the address the client reached
/// this node at (what it is named by when it is the primary itself).
pub(super) async fn command(
    shared: Arc<Shared>,
    args: Vec<Bytes>,
    local: Option<SocketAddr>,
) -> Reply {
    let sub = String::from_utf8_lossy(&args[1]).to_ascii_uppercase();
    let name = args.get(2).map(|n| String::from_utf8_lossy(n).into_owned());
    let ours = name.as_deref() == Some(shared.config.sentinel_name.as_str());
    let no_such = || Reply::err("No such master with that name");
    match (sub.as_str(), args.len()) {
        ("MASTERS", 2) => {
            let primary = find_primary(&shared, local).await;
            let replicas = replicas(&shared, &primary).await.len();
            Reply::Array(vec![master_info(&shared, &primary, replicas)])
        }
        ("MASTER", 3) if ours => {
            let primary = find_primary(&shared, local).await;
            let replicas = replicas(&shared, &primary).await.len();
            master_info(&shared, &primary, replicas)
        }
        ("GET-MASTER-ADDR-BY-NAME", 3) if ours => {
            // Clients that ask only this (go-redis, Jedis, Lettuce,
            // redis-cli) see no flags: a primary that does not answer, or
            // none known (a node standing by), is a null, and they ask the
            // next node, which may know the new one.
            let primary = find_primary(&shared, local).await;
            if !primary.up {
                return Reply::Nil;
            }
            let (ip, port) = split(&primary.addr);
            Reply::Array(vec![Reply::bulk(ip), Reply::bulk(port.to_string())])
        }
        ("GET-MASTER-ADDR-BY-NAME", 3) => Reply::Nil,
        ("REPLICAS" | "SLAVES", 3) if ours => {
            let primary = find_primary(&shared, local).await;
            let (host, port) = split(&primary.addr);
            let list = replicas(&shared, &primary).await;
            Reply::Array(
                list.into_iter()
                    .map(|(ip, p, offset)| replica_info(&shared, &ip, p, offset, &host, port))
                    .collect(),
            )
        }
        // The other nodes' Sentinel ports are not known here (peers are
        // client ports): clients are given every node's.
        ("SENTINELS", 3) if ours => Reply::Array(Vec::new()),
        ("MASTER" | "REPLICAS" | "SLAVES" | "SENTINELS", 3) => no_such(),
        ("MYID", 2) => Reply::bulk(shared.node_id.clone()),
        _ => Reply::err(format!(
            "SENTINEL {sub}: a tidewal node answers MASTERS, MASTER, GET-MASTER-ADDR-BY-NAME, REPLICAS, SLAVES, SENTINELS and MYID (with the name, where Sentinel takes one)"
        )),
    }
}

/// This node if it is the primary, else up its upstreams to the primary.
async fn find_primary(shared: &Shared, local: Option<SocketAddr>) -> Primary {
    if !shared.is_replica() {
        // Its client port; listening on every address, at the address the
        // client reached this node at.
        let mut addr = shared.listen;
        if let Some(local) = local
            && addr.ip().is_unspecified()
        {
            addr.set_ip(local.ip().to_canonical());
        }
        return Primary {
            addr: addr.to_string(),
            up: true,
        };
    }
    let upstream = shared.replica_of();
    if let Ok(cache) = shared.sentinel_walk.lock()
        && let Some((at, from, addr, up)) = cache.as_ref()
        && at.elapsed() < WALK_CACHED
        && *from == upstream
    {
        return Primary {
            addr: addr.clone(),
            up: *up,
        };
    }
    let found = walk(upstream.clone()).await;
    if let Ok(mut cache) = shared.sentinel_walk.lock() {
        *cache = Some((
            std::time::Instant::now(),
            upstream,
            found.addr.clone(),
            found.up,
        ));
    }
    found
}

/// Up the upstreams from `addr` to a node that answers as the primary.
async fn walk(mut addr: String) -> Primary {
    for _ in 0..HOPS_MAX {
        let answer = super::failover::call(&addr, &[super::failover::WHO_COMMAND], ASK).await;
        let next = match &answer {
            Ok(Reply::Array(a)) => match a.as_slice() {
                [Reply::Bulk(role), Reply::Int(_), Reply::Bulk(upstream), ..] => {
                    if role.as_ref() == b"primary" {
                        return Primary { addr, up: true };
                    }
                    String::from_utf8_lossy(upstream).into_owned()
                }
                _ => String::new(),
            },
            _ => String::new(),
        };
        if next.is_empty() {
            break;
        }
        addr = next;
    }
    Primary { addr, up: false }
}

/// The primary's replicas that serve reads, `(ip, port, offset)`
/// (`TIDEWAL.REPLICAS`: `ROLE`'s list without warm standbys).
async fn replicas(shared: &Shared, primary: &Primary) -> Vec<(String, u16, u64)> {
    if !primary.up {
        return Vec::new();
    }
    let answer = if !shared.is_replica() {
        super::replication::readable_replicas(shared)
    } else {
        let ask = [super::replication::REPLICAS_COMMAND];
        match super::failover::call(&primary.addr, &ask, ASK).await {
            Ok(r) => r,
            Err(_) => return Vec::new(),
        }
    };
    let text = |r: &Reply| match r {
        Reply::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Reply::Int(n) => Some(n.to_string()),
        _ => None,
    };
    let Reply::Array(list) = answer else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|r| match r {
            Reply::Array(v) if v.len() == 3 => Some((
                text(&v[0])?,
                text(&v[1])?.parse().ok()?,
                text(&v[2])?.parse().unwrap_or(0),
            )),
            _ => None,
        })
        .collect()
}

fn split(addr: &str) -> (String, u16) {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host.to_string(), port.parse().unwrap_or(0))
}

/// Sentinel's `field value ...`: a flat list in RESP2, a map in RESP3.
fn fields(pairs: Vec<(&str, String)>) -> Reply {
    Reply::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Reply::bulk(k.to_string()), Reply::bulk(v)))
            .collect(),
    )
}

fn master_info(shared: &Shared, primary: &Primary, replicas: usize) -> Reply {
    let (ip, port) = split(&primary.addr);
    let timeout = shared.config.election_timeout_ms.to_string();
    let peers = super::failover::peers(shared).len();
    fields(vec![
        ("name", shared.config.sentinel_name.clone()),
        ("ip", ip),
        ("port", port.to_string()),
        ("runid", String::new()),
        (
            "flags",
            if primary.up {
                "master"
            } else {
                "master,s_down,o_down"
            }
            .to_string(),
        ),
        ("link-pending-commands", "0".into()),
        ("link-refcount", "1".into()),
        ("last-ping-sent", "0".into()),
        ("last-ok-ping-reply", "0".into()),
        ("last-ping-reply", "0".into()),
        ("down-after-milliseconds", timeout.clone()),
        ("info-refresh", "0".into()),
        ("role-reported", "master".into()),
        ("role-reported-time", "0".into()),
        ("config-epoch", "0".into()),
        ("num-slaves", replicas.to_string()),
        ("num-other-sentinels", "0".into()),
        ("quorum", (peers / 2 + 1).to_string()),
        ("failover-timeout", timeout),
        ("parallel-syncs", "1".into()),
    ])
}

fn replica_info(
    shared: &Shared,
    ip: &str,
    port: u16,
    offset: u64,
    primary_host: &str,
    primary_port: u16,
) -> Reply {
    fields(vec![
        ("name", format!("{ip}:{port}")),
        ("ip", ip.to_string()),
        ("port", port.to_string()),
        ("runid", String::new()),
        ("flags", "slave".into()),
        ("link-pending-commands", "0".into()),
        ("link-refcount", "1".into()),
        ("last-ping-sent", "0".into()),
        ("last-ok-ping-reply", "0".into()),
        ("last-ping-reply", "0".into()),
        (
            "down-after-milliseconds",
            shared.config.election_timeout_ms.to_string(),
        ),
        ("info-refresh", "0".into()),
        ("role-reported", "slave".into()),
        ("role-reported-time", "0".into()),
        ("master-link-down-time", "0".into()),
        ("master-link-status", "ok".into()),
        ("master-host", primary_host.to_string()),
        ("master-port", primary_port.to_string()),
        ("slave-priority", "100".into()),
        ("slave-repl-offset", offset.to_string()),
    ])
}

/// How often a subscribed connection looks for a new primary.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// A Sentinel connection after `SUBSCRIBE` or `PSUBSCRIBE` (`first`):
/// publishes `+switch-master` (`name old-ip old-port new-ip new-port`, as
/// Sentinel does) when the primary this node finds changes, which clients
/// such as Jedis wait for instead of asking again. It takes more
/// (P)SUBSCRIBEs, (P)UNSUBSCRIBE (the connection closes once nothing is
/// subscribed), PING and QUIT; anything else gets an error.
pub(super) async fn pubsub(
    mut stream: glommio::net::TcpStream,
    shared: Arc<Shared>,
    first: Vec<Bytes>,
    resp3: bool,
    local: Option<SocketAddr>,
    mut input: bytes::BytesMut,
) {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let mut subs = Subscriptions {
        resp3,
        ..Default::default()
    };
    let mut out = bytes::BytesMut::new();
    subs.command(&first, &mut out);
    // The master the client knows: the one this node names now.
    let mut current = find_primary(&shared, local).await.addr;
    let mut parser = super::resp::Parser::default();
    let limits = super::resp::Limits {
        bulk_bytes_max: 1 << 16,
        args_max: 1024,
        inline_bytes_max: 1 << 16,
    };
    let mut scratch = vec![0u8; 4096];
    let mut watched = std::time::Instant::now();
    loop {
        loop {
            let frame = match parser.parse(&input, &limits) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    let _ = stream
                        .write_all(format!("-ERR Protocol error: {e}\r\n").as_bytes())
                        .await;
                    return;
                }
            };
            let bytes = input.split_to(frame.consumed).freeze();
            let args = frame.arguments(&bytes);
            if args.is_empty() {
                continue;
            }
            if args[0].eq_ignore_ascii_case(b"QUIT") {
                let _ = stream.write_all(b"+OK\r\n").await;
                return;
            }
            subs.command(&args, &mut out);
            if subs.is_empty() {
                // Nothing subscribed: the connection closes (below), so
                // what the client sent after that is not answered.
                break;
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if subs.is_empty() || shared.stopping() || input.len() > 1 << 20 {
            return;
        }
        if watched.elapsed() >= WATCH_EVERY {
            watched = std::time::Instant::now();
            let primary = find_primary(&shared, local).await;
            if primary.up && primary.addr != current {
                let (old_ip, old_port) = split(&current);
                let (new_ip, new_port) = split(&primary.addr);
                let payload = format!(
                    "{} {old_ip} {old_port} {new_ip} {new_port}",
                    shared.config.sentinel_name
                );
                subs.publish("+switch-master", &payload, &mut out);
                current = primary.addr;
                continue;
            }
        }
        // The stream's read timeout (the client connection's) brings the
        // loop back to look for a new primary.
        match stream.read(&mut scratch).await {
            Ok(0) => return,
            Ok(n) => input.extend_from_slice(&scratch[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

/// What a pub/sub connection is subscribed to, and how it is answered.
#[derive(Default)]
struct Subscriptions {
    channels: Vec<Bytes>,
    patterns: Vec<Bytes>,
    resp3: bool,
}

impl Subscriptions {
    fn is_empty(&self) -> bool {
        self.channels.is_empty() && self.patterns.is_empty()
    }

    fn count(&self) -> i64 {
        (self.channels.len() + self.patterns.len()) as i64
    }

    /// A pushed message: RESP2's array, RESP3's push.
    fn push(&self, items: Vec<Reply>, out: &mut bytes::BytesMut) {
        if self.resp3 {
            out.extend_from_slice(format!(">{}\r\n", items.len()).as_bytes());
            for item in items {
                item.encode_as(out, true);
            }
        } else {
            Reply::Array(items).encode(out);
        }
    }

    fn command(&mut self, args: &[Bytes], out: &mut bytes::BytesMut) {
        let name = args[0].to_ascii_uppercase();
        match name.as_slice() {
            b"SUBSCRIBE" | b"PSUBSCRIBE" if args.len() > 1 => {
                let pattern = name.as_slice() == b"PSUBSCRIBE";
                for ch in &args[1..] {
                    let ch = Bytes::copy_from_slice(ch);
                    let list = if pattern {
                        &mut self.patterns
                    } else {
                        &mut self.channels
                    };
                    if !list.contains(&ch) {
                        list.push(ch.clone());
                    }
                    let kind = if pattern { "psubscribe" } else { "subscribe" };
                    let count = self.count();
                    self.push(vec![Reply::bulk(kind), Reply::Bulk(ch), Reply::Int(count)], out);
                }
            }
            b"UNSUBSCRIBE" | b"PUNSUBSCRIBE" => {
                let pattern = name.as_slice() == b"PUNSUBSCRIBE";
                let list = if pattern {
                    &mut self.patterns
                } else {
                    &mut self.channels
                };
                let gone: Vec<Bytes> = if args.len() > 1 {
                    args[1..].iter().map(|a| Bytes::copy_from_slice(a)).collect()
                } else {
                    list.clone()
                };
                list.retain(|c| !gone.contains(c));
                let kind = if pattern { "punsubscribe" } else { "unsubscribe" };
                for ch in gone {
                    let count = self.count();
                    self.push(vec![Reply::bulk(kind), Reply::Bulk(ch), Reply::Int(count)], out);
                }
            }
            b"PING" => {
                let message = args.get(1).cloned().unwrap_or_default();
                self.push(vec![Reply::bulk("pong"), Reply::Bulk(message)], out);
            }
            _ => Reply::err(format!(
                "Can't execute '{}': only (P)SUBSCRIBE / (P)UNSUBSCRIBE / PING / QUIT are allowed in this context",
                String::from_utf8_lossy(&args[0]).to_lowercase()
            ))
            .encode_as(out, self.resp3),
        }
    }

    /// Sends `payload` on `channel` to this connection, once per
    /// subscription that matches it.
    fn publish(&self, channel: &str, payload: &str, out: &mut bytes::BytesMut) {
        if self
            .channels
            .iter()
            .any(|c| c.as_ref() == channel.as_bytes())
        {
            self.push(
                vec![
                    Reply::bulk("message"),
                    Reply::bulk(channel.to_string()),
                    Reply::bulk(payload.to_string()),
                ],
                out,
            );
        }
        for p in &self.patterns {
            if super::glob::matches(p, channel.as_bytes()) {
                self.push(
                    vec![
                        Reply::bulk("pmessage"),
                        Reply::Bulk(p.clone()),
                        Reply::bulk(channel.to_string()),
                        Reply::bulk(payload.to_string()),
                    ],
                    out,
                );
            }
        }
    }
}
