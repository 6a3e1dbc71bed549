//! A TCP fault proxy for replication tests: sits between a replica and
//! its upstream and, on command, delays, drops, corrupts, stalls or cuts
//! what flows from the upstream to the replica.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Control {
    /// Connections are closed and new ones refused while set.
    cut: AtomicBool,
    /// Bytes are held (not forwarded) while set.
    stall: AtomicBool,
    /// Flip one bit in the next chunk from the upstream.
    corrupt_next: AtomicBool,
    /// Drop the next chunk from the upstream.
    drop_next: AtomicBool,
    /// Delay per chunk from the upstream, in milliseconds.
    delay_ms: AtomicU64,
    /// Chunks corrupted or dropped so far.
    faults: AtomicU64,
    open: Mutex<Vec<TcpStream>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    control: Arc<Control>,
}

impl Proxy {
    /// Forwards connections made to `addr` to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let control = Arc::new(Control::default());
        let c = control.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if let Ok(mut open) = c.open.lock() {
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                let (c1, c2) = (c.clone(), c.clone());
                let (client2, server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(client, server, &c1, false));
                std::thread::spawn(move || pump(server2, client2, &c2, true));
            }
        });
        Proxy { addr, control }
    }

    /// Closes every connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.control.cut.store(true, Ordering::SeqCst);
        if let Ok(mut open) = self.control.open.lock() {
            for s in open.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    pub fn heal(&self) {
        self.control.cut.store(false, Ordering::SeqCst);
        self.control.stall.store(false, Ordering::SeqCst);
        self.control.delay_ms.store(0, Ordering::SeqCst);
    }

    pub fn stall(&self) {
        self.control.stall.store(true, Ordering::SeqCst);
    }

    pub fn delay(&self, ms: u64) {
        self.control.delay_ms.store(ms, Ordering::SeqCst);
    }

    pub fn corrupt_next(&self) {
        self.control.corrupt_next.store(true, Ordering::SeqCst);
    }

    pub fn drop_next(&self) {
        self.control.drop_next.store(true, Ordering::SeqCst);
    }

    /// Chunks corrupted or dropped so far.
    pub fn faults(&self) -> u64 {
        self.control.faults.load(Ordering::SeqCst)
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, c: &Control, downstream: bool) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if downstream {
            while c.stall.load(Ordering::SeqCst) && !c.cut.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let delay = c.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            if c.drop_next.swap(false, Ordering::SeqCst) {
                c.faults.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            if c.corrupt_next.swap(false, Ordering::SeqCst) {
                c.faults.fetch_add(1, Ordering::SeqCst);
                buf[n / 2] ^= 0x10;
            }
        }
        if c.cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
