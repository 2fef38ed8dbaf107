//! The service's memory allocator: mimalloc, tuned for a long-running service.
//!
//! Why not the system allocator: the message path allocates and frees many
//! short-lived strings and maps per event, in bursts of a batch; glibc's
//! allocator spent about a fifth of the service's CPU there (BENCHMARKS.md,
//! issue 4).
//!
//! Two settings, each measured with `workmanager bench --soak-messages 1000000`:
//! - built without transparent huge pages (`no_thp`): with them the idle
//!   service's RSS was 30 MB instead of 14 MB;
//! - freed pages go back to the OS at once (purge delay 0) instead of after
//!   a second: with the default delay RSS swung ±11% in a soak, with 0 it
//!   stays flat and lowest.

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
    // table; the option index is in range and 0 is a documented value
    // ("0 for immediate purging").
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}
