//! How a process that moves bulk data keeps its memory: freed heap memory stays in the
//! process for the next buffer instead of going back to the kernel.
//!
//! Why: a transfer allocates and frees a buffer per chunk (up to 256 KiB: received
//! frames, chunks read back, chunks cut from a file), thousands a second. glibc gives
//! allocations over its mmap threshold (dynamic, from 128 KiB) their own mapping and
//! trims the top of each heap past 128 KiB free, so much of that memory went back to the
//! kernel after each use and came back as fresh pages. Fresh pages are dear: each is
//! zeroed by the kernel, and on a VM whose host reclaims the pages its guest frees (free
//! page reporting, as on the machines we measure) each first touch is also a fault in
//! the host, ~9 µs per 4 KiB page. With the thresholds raised, the copy of every chunk
//! read from a pack fell out of the coordinator's profile, where it had been 61% of its
//! CPU time while serving a download (ARCHITECTURE.md, "Bulk memory stays in the
//! process").
//!
//! The price is that a process keeps the peak of what it freed, bounded by its own
//! working set (the transfer's bounded buffers), until it exits.

/// Largest allocation served from the heap rather than from a mapping of its own: a
/// whole frame ([`gantry_protocol::limits::MAX_FRAME_BYTES`], 4 MiB) with room to spare.
/// glibc's ceiling for this setting is 32 MiB on 64-bit.
pub const HEAP_ALLOCATION_MAX: usize = 32 * 1024 * 1024;
/// Free memory at the top of a heap that glibc keeps rather than trims.
pub const HEAP_KEEP_FREE: usize = 256 * 1024 * 1024;

/// Raises glibc's mmap and trim thresholds (see the module docs). Call it at the start
/// of `main`, before other threads exist. Does nothing where the C library is not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    set_glibc_thresholds();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_glibc_thresholds() {
    for (param, value, what) in [
        (libc::M_MMAP_THRESHOLD, HEAP_ALLOCATION_MAX, "mmap"),
        (libc::M_TRIM_THRESHOLD, HEAP_KEEP_FREE, "trim"),
    ] {
        let value = i32::try_from(value).unwrap_or(i32::MAX);
        // SAFETY: mallopt only sets one of the allocator's tuning parameters; both
        // values are within the ranges glibc documents (it refuses, returning 0, what
        // is not).
        if unsafe { libc::mallopt(param, value) } == 0 {
            tracing::debug!("glibc refused the malloc {what} threshold {value}");
        }
    }
}
