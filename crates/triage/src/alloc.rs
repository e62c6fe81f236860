//! Allocator settings for long tensor work.
//!
//! Training and prefill allocate and free tensors of megabytes hundreds of times per step.
//! glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh `mmap`s and gives
//! them back with `munmap`, so every step pays page faults and zeroing for the same sizes
//! again: the profile of a training step showed ~40 % of its CPU time in the kernel. Raising
//! the mmap threshold and the trim threshold keeps freed blocks in the heap for reuse.
//! Measured with `triage bench train` (`docs/benchmarks.md`). Set `TRIAGE_MALLOC_DEFAULT=1`
//! to keep glibc's defaults.

/// Environment variable that keeps glibc's default allocator settings.
pub const DEFAULT_ENV: &str = "TRIAGE_MALLOC_DEFAULT";

/// Applies the settings (glibc on Linux; elsewhere nothing).
pub fn tune() {
    if std::env::var_os(DEFAULT_ENV).is_some_and(|v| v != "0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called once at start-up,
    // before any other thread exists.
    unsafe {
        // Blocks up to 1 GiB come from the heap and are reused; freed memory above 2 GiB at
        // the top of the heap is returned to the system.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 << 30);
    }
}
