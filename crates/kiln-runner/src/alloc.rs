//! The runner's global allocator: the system allocator plus a small cache of freed blocks.
//!
//! tract allocates the same buffers (im2col patches, activations) at every inference.
//! musl's allocator, which the static runners link, returns each one to the kernel when it
//! is freed and maps it anew, zero-filled page by page, at the next run. Keeping up to
//! `SLOTS` freed blocks of at least `MIN_SIZE` bytes (at most `MAX_CACHED` in all) and handing
//! them back for an allocation of the very same size and alignment removes that: after the
//! first inference, tract's buffers come from the cache. `MIN_SIZE` is one page: an int8
//! model's activations are 4x smaller than fp32's, and with a 64 KiB floor most of
//! MobileNetV2's int8 tensors missed the cache (19% of its time went to page faults).
//! Smaller blocks go straight to the system allocator. (mimalloc would do this and more, but needs a C toolchain for the
//! musl targets, which link with rust-lld and no musl C compiler.)
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks below this size are not cached.
const MIN_SIZE: usize = 4 * 1024;
/// Most blocks kept at once.
const SLOTS: usize = 256;
/// Most bytes kept at once.
const MAX_CACHED: usize = 128 << 20;

/// A freed block: address, size, alignment (address 0: empty slot).
type Slot = (usize, usize, usize);

/// The system allocator with a cache of large freed blocks (see the module doc).
pub struct Caching {
    lock: AtomicBool,
    slots: UnsafeCell<[Slot; SLOTS]>,
    cached: UnsafeCell<usize>,
}

// SAFETY: `slots` and `cached` are only touched while `lock` is held (see `with`).
unsafe impl Sync for Caching {}

impl Caching {
    /// An empty cache.
    pub const fn new() -> Caching {
        Caching {
            lock: AtomicBool::new(false),
            slots: UnsafeCell::new([(0, 0, 0); SLOTS]),
            cached: UnsafeCell::new(0),
        }
    }

    /// Runs `f` on the cache under its spin lock (held for a scan of `SLOTS` slots at most).
    fn with<R>(&self, f: impl FnOnce(&mut [Slot; SLOTS], &mut usize) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let r = unsafe { f(&mut *self.slots.get(), &mut *self.cached.get()) };
        self.lock.store(false, Ordering::Release);
        r
    }

    /// A cached block of exactly `layout`, if one is kept.
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        if layout.size() < MIN_SIZE {
            return None;
        }
        self.with(|slots, cached| {
            let slot = slots
                .iter_mut()
                .find(|s| s.0 != 0 && s.1 == layout.size() && s.2 == layout.align())?;
            let ptr = slot.0 as *mut u8;
            *cached -= slot.1;
            *slot = (0, 0, 0);
            Some(ptr)
        })
    }

    /// Keeps a freed block if there is room; false when the caller must free it.
    fn keep(&self, ptr: *mut u8, layout: Layout) -> bool {
        if layout.size() < MIN_SIZE {
            return false;
        }
        self.with(|slots, cached| {
            if *cached + layout.size() > MAX_CACHED {
                return false;
            }
            match slots.iter_mut().find(|s| s.0 == 0) {
                Some(slot) => {
                    *slot = (ptr as usize, layout.size(), layout.align());
                    *cached += layout.size();
                    true
                }
                None => false,
            }
        })
    }
}

impl Default for Caching {
    fn default() -> Self {
        Caching::new()
    }
}

// SAFETY: every block handed out was allocated by `System` with the same layout it is asked
// for (cache hits match size and alignment exactly), and every block is either kept or
// returned to `System` with the layout it was allocated with.
unsafe impl GlobalAlloc for Caching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.take(layout) {
            Some(ptr) => ptr,
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match self.take(layout) {
            Some(ptr) => {
                unsafe { ptr.write_bytes(0, layout.size()) };
                ptr
            }
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !self.keep(ptr, layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < MIN_SIZE && new_size < MIN_SIZE {
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: `new_size` with the old alignment is a valid layout (GlobalAlloc contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_come_back_for_the_same_layout_only() {
        let a = Caching::new();
        let big = Layout::from_size_align(1 << 20, 64).unwrap();
        unsafe {
            let p = a.alloc(big);
            p.write_bytes(7, big.size());
            a.dealloc(p, big);
            // Same layout: the cached block, zeroed on request.
            let q = a.alloc_zeroed(big);
            assert_eq!(q, p);
            assert!(std::slice::from_raw_parts(q, big.size())
                .iter()
                .all(|b| *b == 0));
            // Another size: not that block.
            let other = Layout::from_size_align(1 << 21, 64).unwrap();
            let r = a.alloc(other);
            assert_ne!(r, q);
            a.dealloc(r, other);
            a.dealloc(q, big);
            // Small blocks are never kept.
            let small = Layout::from_size_align(100, 8).unwrap();
            let s = a.alloc(small);
            a.dealloc(s, small);
            assert_eq!(a.with(|_, cached| *cached), 3 << 20);
        }
    }

    #[test]
    fn the_cache_is_bounded() {
        let a = Caching::new();
        let huge = Layout::from_size_align(MAX_CACHED, 8).unwrap();
        unsafe {
            let p = a.alloc(huge);
            let q = a.alloc(huge);
            a.dealloc(p, huge);
            a.dealloc(q, huge); // over MAX_CACHED: freed, not kept
            assert_eq!(a.with(|_, cached| *cached), MAX_CACHED);
        }
    }
}
