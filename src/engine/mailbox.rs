//! A lock-free many-to-one mailbox from any thread into one executor.
//!
//! Requests come from threads and runtimes glommio does not know (tokio, plain
//! threads), so glommio's own channels, which must be connected from inside
//! an executor, cannot carry them. This one is a lock-free queue
//! (`crossbeam_queue::SegQueue`) plus an `AtomicWaker`: a send is a push and a
//! wake, a receive a pop; no mutex on the path.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;

struct Shared<T> {
    queue: SegQueue<T>,
    waker: AtomicWaker,
    /// The receiver is gone: sends fail, and what was queued is dropped
    /// (so a request's reply channel tells its caller at once).
    closed: AtomicBool,
    senders: AtomicUsize,
}

pub(super) struct Sender<T>(Arc<Shared<T>>);
pub(super) struct Receiver<T>(Arc<Shared<T>>);

pub(super) fn mailbox<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        queue: SegQueue::new(),
        waker: AtomicWaker::new(),
        closed: AtomicBool::new(false),
        senders: AtomicUsize::new(1),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queues `item`, or gives it back if the receiver is gone.
    pub fn send(&self, item: T) -> Result<(), T> {
        if self.0.closed.load(Ordering::Acquire) {
            return Err(item);
        }
        self.0.queue.push(item);
        if self.0.closed.load(Ordering::Acquire) {
            // The receiver closed while we pushed: drop what it will never read.
            while self.0.queue.pop().is_some() {}
        }
        self.0.waker.wake();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::AcqRel);
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.waker.wake(); // the receiver sees the end
        }
    }
}

impl<T> Receiver<T> {
    /// The next item, or `None` once every sender is gone and the queue is empty.
    pub fn recv(&self) -> impl Future<Output = Option<T>> + '_ {
        std::future::poll_fn(move |cx| {
            if let Some(item) = self.0.queue.pop() {
                return Poll::Ready(Some(item));
            }
            self.0.waker.register(cx.waker());
            // Re-check after registering: a send in between woke nobody.
            if let Some(item) = self.0.queue.pop() {
                return Poll::Ready(Some(item));
            }
            if self.0.senders.load(Ordering::Acquire) == 0 {
                // Every send happened before its sender's drop, which we
                // have now seen: one last pop cannot miss it.
                return Poll::Ready(self.0.queue.pop());
            }
            Poll::Pending
        })
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        while self.0.queue.pop().is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_threads_one_receiver() {
        let (tx, rx) = mailbox::<u32>();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        tx.send(t * 1000 + i).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let mut got = Vec::new();
        futures_lite::future::block_on(async {
            while let Some(v) = rx.recv().await {
                got.push(v);
            }
        });
        for t in threads {
            t.join().unwrap();
        }
        got.sort_unstable();
        assert_eq!(got, (0..4000).collect::<Vec<_>>());
    }

    #[test]
    fn sends_fail_once_the_receiver_is_gone() {
        let (tx, rx) = mailbox::<u32>();
        drop(rx);
        assert_eq!(tx.send(7), Err(7));
    }
}
