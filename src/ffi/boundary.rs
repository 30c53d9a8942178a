//! The plumbing every exported function shares: the panic boundary, the one mapping of
//! errors to `-errno` with the thread-local error message, the handle's ownership (made here,
//! released here), and the one place where pointers from C are checked and become Rust
//! references, slices and out-parameters.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;

use super::fdcast;
use crate::error::Error;
use crate::registry::Registry;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Runs `body`, turning a panic into `on_panic` (and a message in `fdcast_last_error`), so
/// no unwind ever crosses into C.
pub(crate) fn boundary<T>(on_panic: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            let reason = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_last_error(&format!("internal error (please report): {reason}"));
            on_panic
        }
    }
}

/// The boundary of a function returning a count or an id as `int64_t`: the value, or
/// `-errno` with the detail recorded for `fdcast_last_error`; `-EIO` after a panic.
pub(crate) fn returning_i64(body: impl FnOnce() -> Result<i64, Error>) -> i64 {
    boundary(-i64::from(libc::EIO), || code(body()))
}

/// The boundary of a function returning `int` 0 on success, or `-errno`; `-EIO` after a
/// panic.
pub(crate) fn returning_status(body: impl FnOnce() -> Result<(), Error>) -> c_int {
    boundary(-libc::EIO, || status(body()))
}

fn code(result: Result<i64, Error>) -> i64 {
    match result {
        Ok(value) => value,
        Err(err) => {
            set_last_error(&err.to_string());
            -i64::from(err.errno())
        }
    }
}

fn status(result: Result<(), Error>) -> c_int {
    match result {
        Ok(()) => 0,
        Err(err) => {
            set_last_error(&err.to_string());
            -err.errno()
        }
    }
}

pub(crate) fn set_last_error(message: &str) {
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = message);
}

/// The current thread's last error message; valid until this thread's next failing call.
pub(crate) fn last_error() -> *const c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

/// A new handle owning `registry`, which C releases with `fdcast_free` ([`free_handle`]).
pub(crate) fn new_handle(registry: Registry) -> *mut fdcast {
    Box::into_raw(Box::new(fdcast { registry }))
}

/// Releases a handle from [`new_handle`]; NULL is a no-op.
///
/// # Safety
/// `fc` is NULL or a handle from [`new_handle`] not released yet, with no call on it in
/// flight, as the header requires of callers; it is invalid afterwards.
pub(crate) unsafe fn free_handle(fc: *mut fdcast) {
    if !fc.is_null() {
        // SAFETY: per this function's contract, `fc` came from `Box::into_raw` in
        // `new_handle` and nothing else uses it, so the Box may take it back, once.
        drop(unsafe { Box::from_raw(fc) });
    }
}

/// The registry behind a handle, or `EINVAL` for NULL.
///
/// # Safety
/// `fc` is NULL or a handle from `fdcast_new` that has not been freed, as the header
/// requires of callers; the reference does not outlive the exported call.
pub(crate) unsafe fn registry<'a>(fc: *const fdcast) -> Result<&'a Registry, Error> {
    // SAFETY: per this function's contract, a non-NULL `fc` points to a live `fdcast`, which
    // is only ever shared (all its methods take `&self`).
    unsafe { fc.as_ref() }
        .map(|handle| &handle.registry)
        .ok_or(Error::InvalidArgument("the fdcast handle is NULL"))
}

/// A byte buffer from C: any pointer (NULL included) for a length of 0, else a non-NULL
/// pointer to `len` readable bytes.
///
/// # Safety
/// A non-NULL `ptr` points to `len` bytes that stay readable and unmodified for the call.
pub(crate) unsafe fn bytes<'a>(
    ptr: *const u8,
    len: usize,
    what: &'static str,
) -> Result<&'a [u8], Error> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() || len > isize::MAX as usize {
        return Err(Error::InvalidArgument(what));
    }
    // SAFETY: `ptr` is non-NULL, `len` fits `isize`, and the caller guarantees `len` readable
    // bytes for the duration of the call.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A writable byte buffer from C: any pointer (NULL included) for a length of 0, else a
/// non-NULL pointer to `len` writable bytes.
///
/// # Safety
/// A non-NULL `ptr` points to `len` writable bytes that nothing else reads or writes during
/// the call.
pub(crate) unsafe fn bytes_mut<'a>(
    ptr: *mut u8,
    len: usize,
    what: &'static str,
) -> Result<&'a mut [u8], Error> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() || len > isize::MAX as usize {
        return Err(Error::InvalidArgument(what));
    }
    // SAFETY: `ptr` is non-NULL, `len` fits `isize`, and the caller guarantees `len`
    // writable, unaliased bytes for the duration of the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// A required out-parameter: non-NULL, or `EINVAL`. The caller writes it with
/// `NonNull::write`, never through a reference, so its previous contents need not be valid.
pub(crate) fn out_param<T>(ptr: *mut T, what: &'static str) -> Result<NonNull<T>, Error> {
    NonNull::new(ptr).ok_or(Error::InvalidArgument(what))
}

/// Fills an optional out-parameter: a NULL `ptr` is a no-op. Written without forming a
/// reference, so its previous contents need not be valid.
///
/// # Safety
/// A non-NULL `ptr` points to a writable, suitably aligned `T` that nothing else reads or
/// writes during the call.
pub(crate) unsafe fn fill_optional<T>(ptr: *mut T, value: T) {
    if let Some(out) = NonNull::new(ptr) {
        // SAFETY: non-NULL, and writable and aligned per this function's contract.
        unsafe { out.write(value) };
    }
}

/// A writable array of `cap` ints from C; NULL is allowed when `cap` is 0.
///
/// # Safety
/// A non-NULL `ptr` points to `cap` writable ints not aliased elsewhere for the call.
pub(crate) unsafe fn int_array<'a>(ptr: *mut c_int, cap: usize) -> Result<&'a mut [c_int], Error> {
    if cap == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() || cap > isize::MAX as usize / size_of::<c_int>() {
        return Err(Error::InvalidArgument("fds is NULL with a non-zero cap"));
    }
    // SAFETY: `ptr` is non-NULL, the byte size fits `isize`, and the caller guarantees `cap`
    // writable, unaliased ints for the duration of the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, cap) })
}

/// A NUL-terminated UTF-8 string from C.
///
/// # Safety
/// A non-NULL `ptr` points to a NUL-terminated string readable for the call.
pub(crate) unsafe fn c_str<'a>(ptr: *const c_char, what: &'static str) -> Result<&'a str, Error> {
    if ptr.is_null() {
        return Err(Error::InvalidArgument(what));
    }
    // SAFETY: non-NULL and NUL-terminated, per this function's contract.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| Error::InvalidArgument(what))
}
