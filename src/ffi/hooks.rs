//! The authorizer and evict callbacks: C function pointers wrapped as Rust closures.

use std::ffi::{c_char, c_int, c_void};

use super::boundary::{boundary, registry, returning_status};
use super::{fdcast, fdcast_mode, mode_to_c};

/// Decides whether `fd` may subscribe to `topic[0..topic_len)` in `mode`: return true to
/// allow. `topic` is only valid during the call.
///
/// Runs on the thread calling fdcast_subscribe, with no fdcast lock held: it may call any
/// fdcast function except fdcast_free (a nested fdcast_subscribe runs the authorizer again).
#[allow(non_camel_case_types)]
pub type fdcast_authorize_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        topic: *const c_char,
        topic_len: usize,
        fd: c_int,
        mode: fdcast_mode,
    ) -> bool,
>;

/// Told that `fd` was evicted: its subscriptions and queued bytes are already gone. `reason`
/// is a positive errno: the failed write's (EPIPE, ECONNRESET, ...) or ENOBUFS for
/// FDCAST_EVICT. The fd stays open and the host's: close it (typically from the event loop,
/// after this returns).
///
/// Runs on the thread that found the condition, inside fdcast_publish, fdcast_send or
/// fdcast_dispatch, with no fdcast lock held: it may call any fdcast function except
/// fdcast_free. Not called for fdcast_unsubscribe_fd, fdcast_clear or the fd-reuse guard.
#[allow(non_camel_case_types)]
pub type fdcast_evict_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, fd: c_int, reason: c_int)>;

/// Told that `fd` lost `lost` messages of `topic[0..topic_len)`: with history on, an fd whose
/// outbox could not take a message of the topic fell behind instead of dropping it, catching up
/// from the topic's history as it drained, and these messages left the history (its count,
/// byte or age limit) before the fd got them. They are counted in lost_to_gaps of the fd's
/// fdcast_fd_stats and of fdcast_stats. Then the overflow policy applies: with
/// FDCAST_DROP_MESSAGE the fd goes on from the oldest message still kept; with FDCAST_EVICT it
/// is evicted right after this returns (the evict callback follows, with ENOBUFS). `topic` is
/// only valid during the call.
///
/// Also told, under shared history, of messages of the topic that never reached this process:
/// with NATS JetStream, messages of fdcast publishers that the stream discarded (the topic's
/// limit) before this process's consumer delivered them; with Redis, entries the stream no
/// longer held when this process fetched what it missed during a lost connection. Each
/// subscriber of the topic here lost them, counted the same way; nobody is evicted for it
/// (inside fdcast_dispatch).
///
/// When: with FDCAST_DROP_MESSAGE, when the fd's outbox drains and fdcast refills it
/// from the history (inside fdcast_dispatch, fdcast_flush or fdcast_uncork), as one call for all that a
/// stalled reader lost; with FDCAST_EVICT, as soon as a publish to the topic finds that the
/// history dropped a message the fd is owed (inside fdcast_publish and its variants), or at
/// the refill; with either, when a publish finds the topic's history made anew (turned off
/// and on) while the fd was behind (everything it was owed is lost). It runs on that
/// thread, with no fdcast lock held (neither the topic's history nor the fd's outbox): it may
/// call any fdcast function except fdcast_free.
#[allow(non_camel_case_types)]
pub type fdcast_gap_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        fd: c_int,
        topic: *const c_char,
        topic_len: usize,
        lost: u64,
    ),
>;

/// The host's `user` pointer, handed back to its callbacks on whatever thread runs them.
struct UserData(*mut c_void);

impl UserData {
    /// A method rather than field access, so closures capture the whole `Send` wrapper.
    fn get(&self) -> *mut c_void {
        self.0
    }
}

// SAFETY: fdcast never dereferences `user`; it passes it back to the host's callback, which the
// header documents may run on any thread that calls into fdcast.
unsafe impl Send for UserData {}
// SAFETY: as above; sharing the pointer value between threads is the documented contract.
unsafe impl Sync for UserData {}

/// Sets the authorizer consulted by every fdcast_subscribe, with `user` passed back to it.
/// A NULL `fn` allows all (the default). A NULL `fc` is a no-op.
///
/// Thread: any; a subscribe already running may still use the previous authorizer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_set_authorizer(
    fc: *mut fdcast,
    authorize: fdcast_authorize_fn,
    user: *mut c_void,
) {
    boundary((), || {
        // SAFETY: the header requires NULL or a live handle.
        let Ok(registry) = (unsafe { registry(fc) }) else {
            return;
        };
        let user = UserData(user);
        registry.set_authorizer(authorize.map(|authorize| {
            Box::new(move |topic: &[u8], fd, mode| {
                // SAFETY: the host supplied `authorize` for exactly this signature; `topic`
                // is valid for the call and `mode` is a valid fdcast_mode.
                unsafe {
                    authorize(
                        user.get(),
                        topic.as_ptr().cast(),
                        topic.len(),
                        fd,
                        mode_to_c(mode),
                    )
                }
            }) as Box<crate::Authorizer>
        }));
    })
}

/// Sets the callback told of each evicted fd, with `user` passed back to it. NULL `fn`
/// removes it. A NULL `fc` is a no-op.
///
/// Thread: any; an eviction already running may still call the previous callback.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_set_evict_callback(
    fc: *mut fdcast,
    on_evict: fdcast_evict_fn,
    user: *mut c_void,
) {
    boundary((), || {
        // SAFETY: the header requires NULL or a live handle.
        let Ok(registry) = (unsafe { registry(fc) }) else {
            return;
        };
        let user = UserData(user);
        registry.set_evict_callback(on_evict.map(|on_evict| {
            Box::new(move |fd, reason| {
                // SAFETY: the host supplied `on_evict` for exactly this signature.
                unsafe { on_evict(user.get(), fd, reason) }
            }) as Box<crate::EvictCallback>
        }));
    })
}

/// Sets the callback told of each gap (see fdcast_gap_fn), with `user` passed back to it. NULL
/// `fn` removes it; gaps are still counted.
///
/// Returns 0 or -EINVAL (NULL `fc`).
///
/// Thread: any; a gap already being reported may still call the previous callback.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_set_gap_callback(
    fc: *mut fdcast,
    on_gap: fdcast_gap_fn,
    user: *mut c_void,
) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires NULL or a live handle.
        let registry = unsafe { registry(fc)? };
        let user = UserData(user);
        registry.set_gap_callback(on_gap.map(|on_gap| {
            Box::new(move |fd, topic: &[u8], lost| {
                // SAFETY: the host supplied `on_gap` for exactly this signature; `topic` is
                // valid for the call.
                unsafe { on_gap(user.get(), fd, topic.as_ptr().cast(), topic.len(), lost) }
            }) as Box<crate::GapCallback>
        }));
        Ok(())
    })
}
