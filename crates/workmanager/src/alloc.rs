//! The service's memory allocator: mimalloc, tuned for a long-running service.
//!
//! Why not the system allocator: the message path allocates and frees many
//! short-lived strings and maps per event, in bursts of a batch; glibc's
//! allocator spent about a fifth of the service's CPU there (BENCHMARKS.md,
//! issue 4).
//!
//! Two settings, each measured with `workmanager bench --soak-messages 1000000`
//! and `workmanager bench --buses-only` (BENCHMARKS.md):
//! - built without transparent huge pages (`no_thp`): with them the idle
//!   service's RSS was 30 MB instead of 14 MB;
//! - freed pages go back to the OS after 100 ms (`PURGE_DELAY_MS`), not at
//!   once and not after mimalloc's default second. Purging at once made
//!   every burst fault its pages in again: on the Redis Streams bus, whose
//!   reads allocate a few hundred KB per batch, `madvise` and page faults
//!   were a fifth of the service's CPU (25–35 µs per message against
//!   17–24 µs with a delay of 10 ms or 1 s). A soak's RSS stays as flat
//!   with 100 ms as with 0 (+4.5–5.7% max over min), where the default
//!   second let it swing ±11% in an earlier build.

/// How long freed memory stays mapped before it goes back to the OS.
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// `mi_option_purge_delay` of `enum mi_option_e` in mimalloc.h (the same in
/// mimalloc 2 and 3); the -sys crate does not export this one.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Applies the settings; call first thing in `main`. An operator's own
/// `MIMALLOC_PURGE_DELAY` (read by mimalloc itself) is left in force.
pub(crate) fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: `mi_option_set` only stores an integer in mimalloc's option
    // table; the option index is in range and the value is a delay in
    // milliseconds, as the option documents.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}
