//! A byte buffer that starts on a block boundary, so that an `O_DIRECT`
//! write can take it as it is, without first copying it into an aligned one.
//!
//! The log stages each batch in one ([`crate::wal`]): the partial block
//! before the batch, its records and the zeros after them are laid out in
//! the buffer exactly as they go to the file, and the buffer is then shared
//! ([`AlignedBuf::share`]) between the write and the readers of recent
//! batches (replication) without a copy.

use std::alloc::{Layout, alloc, dealloc};
use std::ptr::NonNull;
use std::sync::Arc;

use bytes::Bytes;

use super::BLOCK_BYTES;

const ALIGN: usize = BLOCK_BYTES as usize;

/// A growable byte buffer aligned to [`BLOCK_BYTES`], like a `Vec<u8>`
/// whose allocation starts on a block boundary. Its capacity is a whole
/// number of blocks (of huge pages, for a large one).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: the buffer owns its allocation outright, as a `Vec<u8>` does, and
// hands out references to it only through `&self` / `&mut self`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer holding at least `capacity` bytes before it grows.
    pub fn with_capacity(capacity: usize) -> Self {
        let cap = round_capacity(capacity);
        Self {
            ptr: allocate(cap),
            cap,
            len: 0,
        }
    }

    /// The capacity [`AlignedBuf::with_capacity`] gives for `requested`.
    pub fn capacity_for(requested: usize) -> usize {
        round_capacity(requested)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `bytes`, growing (by at least doubling) when full.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        // SAFETY: `reserve` made room for `bytes.len()` bytes past `len`, and
        // `bytes` cannot overlap this buffer's spare capacity (no reference
        // to it exists).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(self.len),
                bytes.len(),
            );
        }
        self.len += bytes.len();
    }

    /// Appends `n` zero bytes.
    pub fn extend_zeros(&mut self, n: usize) {
        self.reserve(n);
        // SAFETY: `reserve` made room for `n` bytes past `len`.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(self.len), 0, n) };
        self.len += n;
    }

    /// Makes room for `additional` more bytes.
    pub fn reserve(&mut self, additional: usize) {
        let needed = self
            .len
            .checked_add(additional)
            .expect("buffer size overflow");
        if needed <= self.cap {
            return;
        }
        let cap = round_capacity(needed.max(self.cap * 2));
        let ptr = allocate(cap);
        // SAFETY: both allocations hold at least `len` bytes and are distinct.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), ptr.as_ptr(), self.len) };
        // SAFETY: the old allocation was made by `allocate(self.cap)`.
        unsafe { dealloc(self.ptr.as_ptr(), layout(self.cap)) };
        self.ptr = ptr;
        self.cap = cap;
    }

    /// Freezes the buffer into shared bytes, keeping a handle that gives the
    /// buffer back (see [`SharedBuf::reclaim`]) once every clone and slice of
    /// the bytes is gone.
    pub fn share(self) -> (Bytes, SharedBuf) {
        let shared = Arc::new(self);
        let bytes = Bytes::from_owner(SharedBuf(shared.clone()));
        (bytes, SharedBuf(shared))
    }
}

/// Handle on a shared [`AlignedBuf`].
pub struct SharedBuf(Arc<AlignedBuf>);

impl SharedBuf {
    /// Bytes of memory the buffer holds.
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// The buffer, if nothing else holds it any more.
    pub fn reclaim(self) -> Option<AlignedBuf> {
        Arc::into_inner(self.0)
    }
}

impl AsRef<[u8]> for SharedBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Buffers of this size or more are allocated in whole huge pages.
const HUGE_BYTES: usize = 2 << 20;

/// A buffer's capacity for `requested` bytes: whole blocks, or whole huge
/// pages from half of one up.
fn round_capacity(requested: usize) -> usize {
    if requested > HUGE_BYTES / 2 {
        requested.next_multiple_of(HUGE_BYTES)
    } else {
        requested.max(1).next_multiple_of(ALIGN)
    }
}

fn layout(cap: usize) -> Layout {
    let align = if cap >= HUGE_BYTES { HUGE_BYTES } else { ALIGN };
    Layout::from_size_align(cap, align).expect("aligned layout")
}

/// Allocates `cap` bytes (a value of `round_capacity`). A large buffer is
/// asked to be backed by transparent huge pages: an `O_DIRECT` write pins
/// its buffer's pages for the device, and pinning one huge page costs about
/// what one small page does, where a 1 MiB batch spans 256 small ones
/// (`gup_fast` was 4-5% of the log's CPU with small pages).
fn allocate(cap: usize) -> NonNull<u8> {
    let layout = layout(cap);
    // SAFETY: `cap` is at least one block, so the layout is not zero-sized.
    let ptr = unsafe { alloc(layout) };
    let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
    if cap >= HUGE_BYTES {
        // SAFETY: advice on memory this buffer owns; it changes how the
        // pages are backed, never their contents. Failure (THP disabled)
        // leaves small pages, which work as before.
        unsafe { libc::madvise(ptr.as_ptr().cast(), cap, libc::MADV_HUGEPAGE) };
    }
    ptr
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: the allocation was made by `allocate(self.cap)`.
        unsafe { dealloc(self.ptr.as_ptr(), layout(self.cap)) };
    }
}

impl crate::format::ByteSink for AlignedBuf {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn last_mut(&mut self, len: usize) -> &mut [u8] {
        let start = self.len - len;
        &mut self[start..]
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes are initialized (written by
        // `extend_from_slice` or `extend_zeros`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_keeping_its_bytes_and_its_alignment() {
        let mut buf = AlignedBuf::with_capacity(10);
        assert_eq!(buf.capacity(), ALIGN);
        let mut expect = Vec::new();
        for i in 0..3000u32 {
            let chunk = i.to_le_bytes();
            buf.extend_from_slice(&chunk);
            expect.extend_from_slice(&chunk);
            if i % 700 == 0 {
                buf.extend_zeros(i as usize);
                expect.resize(expect.len() + i as usize, 0);
            }
            assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
        }
        assert_eq!(&buf[..], &expect[..]);
        assert!(buf.capacity().is_multiple_of(ALIGN));
        buf.clear();
        assert!(buf.is_empty());
    }

    #[test]
    fn a_large_buffer_is_whole_huge_pages_and_grows_as_one() {
        let mut buf = AlignedBuf::with_capacity((1 << 20) + 1);
        assert_eq!(buf.capacity(), HUGE_BYTES);
        assert_eq!(AlignedBuf::capacity_for((1 << 20) + 1), HUGE_BYTES);
        assert_eq!(buf.as_ptr() as usize % HUGE_BYTES, 0);
        let chunk: Vec<u8> = (0..=255).collect();
        for _ in 0..(HUGE_BYTES / 256 + 1) {
            buf.extend_from_slice(&chunk);
        }
        assert_eq!(buf.capacity(), 2 * HUGE_BYTES);
        assert_eq!(buf.as_ptr() as usize % HUGE_BYTES, 0);
        assert!(buf.chunks(256).all(|c| c == &chunk[..]));
        // Half a huge page or less stays in blocks.
        assert_eq!(AlignedBuf::capacity_for(HUGE_BYTES / 2), HUGE_BYTES / 2);
    }

    #[test]
    fn shared_bytes_give_the_buffer_back_only_once_dropped() {
        let mut buf = AlignedBuf::with_capacity(2 * ALIGN);
        buf.extend_from_slice(b"records");
        let (bytes, handle) = buf.share();
        let slice = bytes.slice(2..5);
        assert_eq!(&bytes[..], b"records");
        assert_eq!(bytes.as_ptr() as usize % ALIGN, 0);
        drop(bytes);
        // The slice still holds the buffer.
        assert!(SharedBuf(handle.0.clone()).reclaim().is_none());
        assert_eq!(&slice[..], b"cor");
        drop(slice);
        let back = handle.reclaim().expect("nothing else holds it");
        assert_eq!(&back[..], b"records");
        assert_eq!(back.capacity(), 2 * ALIGN);
    }
}
