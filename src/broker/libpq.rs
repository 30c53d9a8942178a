//! A safe wrapper over the parts of libpq's asynchronous API the PostgreSQL backend uses
//! (PQconnectStart/PQconnectPoll, pipeline mode, PQconsumeInput, PQnotifies). Like `io.rs`,
//! this is a module whose job is the unsafe calls, each with its `// SAFETY:` comment; the
//! backend's logic above it is safe code.

use std::ffi::{CStr, CString, c_char, c_int};
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};

use pq_sys::{
    ConnStatusType, ExecStatusType, PGconn, PQbackendPID, PQclear, PQconnectPoll, PQconnectStart,
    PQconninfoFree, PQconninfoParse, PQconsumeInput, PQenterPipelineMode, PQerrorMessage,
    PQescapeIdentifier, PQfinish, PQflush, PQfreemem, PQgetResult, PQisBusy, PQnotifies,
    PQresultErrorMessage, PQresultStatus, PQsendPipelineSync, PQsendPrepare, PQsendQueryParams,
    PQsendQueryPrepared, PQsetnonblocking, PQsocket, PQstatus, PostgresPollingStatusType,
};

/// One libpq connection. libpq connections are not thread-safe: the owner keeps this behind
/// a mutex, which is why it may be sent to another thread.
pub(crate) struct Connection {
    raw: NonNull<PGconn>,
}

// SAFETY: a PGconn may be used from any thread as long as no two threads use it at once;
// `Connection` needs `&mut self` for every call that touches it, and the backend holds it
// behind a mutex.
unsafe impl Send for Connection {}

/// What `PQconnectPoll` asks for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnectProgress {
    WantRead,
    WantWrite,
    Connected,
    Failed,
}

/// `PQflush`'s answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlushProgress {
    Done,
    Pending,
    Failed,
}

/// The kind of one result, with the server's message for errors.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ResultKind {
    Ok,
    PipelineSync,
    PipelineAborted,
    Error(String),
}

pub(crate) struct Notification {
    pub(crate) sender_pid: i32,
    pub(crate) payload: Vec<u8>,
}

/// The conninfo settings fdcast itself needs, after libpq has validated the whole string.
pub(crate) struct ConninfoSettings {
    pub(crate) connect_timeout_secs: Option<u64>,
}

/// Validates a conninfo string or URI with libpq's own parser.
pub(crate) fn parse_conninfo(conninfo: &CStr) -> Result<ConninfoSettings, String> {
    let mut error: *mut c_char = ptr::null_mut();
    // SAFETY: `conninfo` is NUL-terminated; libpq writes a malloc'd message to `error` on
    // failure, which we free with PQfreemem.
    let options = unsafe { PQconninfoParse(conninfo.as_ptr(), &mut error) };
    if options.is_null() {
        let message = take_libpq_string(error).unwrap_or_else(|| "out of memory".into());
        return Err(message);
    }
    let mut settings = ConninfoSettings {
        connect_timeout_secs: None,
    };
    let mut option = options;
    // SAFETY: PQconninfoParse returns an array terminated by an entry whose keyword is NULL;
    // keyword and val are NUL-terminated strings (val may be NULL) owned by the array until
    // PQconninfoFree.
    unsafe {
        while !(*option).keyword.is_null() {
            let keyword = CStr::from_ptr((*option).keyword);
            if keyword == c"connect_timeout" && !(*option).val.is_null() {
                let value = CStr::from_ptr((*option).val).to_string_lossy();
                settings.connect_timeout_secs = value.trim().parse().ok();
            }
            option = option.add(1);
        }
        PQconninfoFree(options);
    }
    Ok(settings)
}

/// Copies and frees a string libpq allocated.
fn take_libpq_string(raw: *mut c_char) -> Option<String> {
    if raw.is_null() {
        return None;
    }
    // SAFETY: `raw` is a NUL-terminated string allocated by libpq, freed once here.
    unsafe {
        let text = CStr::from_ptr(raw).to_string_lossy().trim_end().to_string();
        PQfreemem(raw.cast());
        Some(text)
    }
}

impl Connection {
    /// Starts connecting without blocking; drive it with [`Connection::poll_connect`].
    pub(crate) fn start(conninfo: &CStr) -> Result<Connection, String> {
        // SAFETY: `conninfo` is NUL-terminated; PQconnectStart copies what it needs.
        let raw = unsafe { PQconnectStart(conninfo.as_ptr()) };
        let raw = NonNull::new(raw).ok_or_else(|| "libpq: out of memory".to_string())?;
        let connection = Connection { raw };
        // SAFETY: `raw` is a live PGconn.
        if unsafe { PQstatus(connection.raw.as_ptr()) } == ConnStatusType::CONNECTION_BAD {
            return Err(connection.error_message());
        }
        Ok(connection)
    }

    pub(crate) fn poll_connect(&mut self) -> ConnectProgress {
        // SAFETY: `raw` is a live PGconn owned by `self`.
        match unsafe { PQconnectPoll(self.raw.as_ptr()) } {
            PostgresPollingStatusType::PGRES_POLLING_READING => ConnectProgress::WantRead,
            PostgresPollingStatusType::PGRES_POLLING_WRITING => ConnectProgress::WantWrite,
            PostgresPollingStatusType::PGRES_POLLING_OK => ConnectProgress::Connected,
            PostgresPollingStatusType::PGRES_POLLING_ACTIVE => ConnectProgress::WantWrite,
            PostgresPollingStatusType::PGRES_POLLING_FAILED => ConnectProgress::Failed,
        }
    }

    /// The connection's socket; it may change while connecting (e.g. a retry without TLS).
    pub(crate) fn socket(&self) -> RawFd {
        // SAFETY: `raw` is a live PGconn.
        unsafe { PQsocket(self.raw.as_ptr()) }
    }

    pub(crate) fn is_bad(&self) -> bool {
        // SAFETY: `raw` is a live PGconn.
        unsafe { PQstatus(self.raw.as_ptr()) == ConnStatusType::CONNECTION_BAD }
    }

    pub(crate) fn error_message(&self) -> String {
        // SAFETY: PQerrorMessage returns a NUL-terminated string owned by the connection,
        // valid until the next call on it; we copy it at once.
        unsafe { CStr::from_ptr(PQerrorMessage(self.raw.as_ptr())) }
            .to_string_lossy()
            .trim_end()
            .to_string()
    }

    pub(crate) fn backend_pid(&self) -> i32 {
        // SAFETY: `raw` is a live PGconn.
        unsafe { PQbackendPID(self.raw.as_ptr()) }
    }

    /// Switches to non-blocking sends and pipeline mode; false (see `error_message`) on failure.
    pub(crate) fn enter_nonblocking_pipeline(&mut self) -> bool {
        // SAFETY: `raw` is a live PGconn with no query in progress.
        unsafe {
            PQsetnonblocking(self.raw.as_ptr(), 1) == 0
                && PQenterPipelineMode(self.raw.as_ptr()) == 1
        }
    }

    /// Quotes `name` as an SQL identifier (libpq's escaping, never ours).
    pub(crate) fn quote_identifier(&mut self, name: &str) -> Option<String> {
        // SAFETY: `name` is valid for `name.len()` bytes; libpq returns a malloc'd
        // NUL-terminated string that take_libpq_string frees.
        let quoted =
            unsafe { PQescapeIdentifier(self.raw.as_ptr(), name.as_ptr().cast(), name.len()) };
        take_libpq_string(quoted)
    }

    /// Queues one statement with text parameters, then a pipeline sync, so the statement
    /// runs in a transaction of its own. False (see `error_message`) if libpq refused.
    /// Queues a statement and a pipeline sync, so it runs in a transaction of its own.
    pub(crate) fn send_statement(&mut self, sql: &CStr, params: &[&CStr]) -> bool {
        self.send_query(sql, params) && self.send_sync()
    }

    /// Queues a statement in the pipeline; the next sync ends its transaction.
    pub(crate) fn send_query(&mut self, sql: &CStr, params: &[&CStr]) -> bool {
        let mut values = [ptr::null::<c_char>(); 2];
        if params.len() > values.len() {
            return false;
        }
        for (value, param) in values.iter_mut().zip(params) {
            *value = param.as_ptr();
        }
        // SAFETY: `sql` and every parameter are NUL-terminated strings that outlive the call
        // (libpq copies them into its output buffer); NULL types, lengths and formats mean
        // "text, infer the type".
        unsafe {
            PQsendQueryParams(
                self.raw.as_ptr(),
                sql.as_ptr(),
                params.len() as c_int,
                ptr::null(),
                values.as_ptr(),
                ptr::null(),
                ptr::null(),
                0,
            ) == 1
        }
    }

    /// Queues the preparation of `sql` as the statement `name`, with `params` text
    /// parameters of inferred types.
    pub(crate) fn send_prepare(&mut self, name: &CStr, sql: &CStr, params: c_int) -> bool {
        // SAFETY: `name` and `sql` are NUL-terminated strings that outlive the call (libpq
        // copies them into its output buffer); NULL types mean "infer".
        unsafe {
            PQsendPrepare(
                self.raw.as_ptr(),
                name.as_ptr(),
                sql.as_ptr(),
                params,
                ptr::null(),
            ) == 1
        }
    }

    /// Queues the prepared statement `name` in the pipeline with text parameters; the next
    /// sync ends its transaction.
    pub(crate) fn send_prepared(&mut self, name: &CStr, params: &[&CStr]) -> bool {
        let mut values = [ptr::null::<c_char>(); 2];
        if params.len() > values.len() {
            return false;
        }
        for (value, param) in values.iter_mut().zip(params) {
            *value = param.as_ptr();
        }
        // SAFETY: `name` and every parameter are NUL-terminated strings that outlive the call
        // (libpq copies them into its output buffer); NULL lengths and formats mean "text".
        unsafe {
            PQsendQueryPrepared(
                self.raw.as_ptr(),
                name.as_ptr(),
                params.len() as c_int,
                values.as_ptr(),
                ptr::null(),
                ptr::null(),
                0,
            ) == 1
        }
    }

    /// Queues a pipeline sync: the statements since the last one commit together.
    pub(crate) fn send_sync(&mut self) -> bool {
        // SAFETY: `raw` is a live PGconn in pipeline mode.
        unsafe { PQsendPipelineSync(self.raw.as_ptr()) == 1 }
    }

    pub(crate) fn flush(&mut self) -> FlushProgress {
        // SAFETY: `raw` is a live PGconn in non-blocking mode, so PQflush does not block.
        match unsafe { PQflush(self.raw.as_ptr()) } {
            0 => FlushProgress::Done,
            1 => FlushProgress::Pending,
            _ => FlushProgress::Failed,
        }
    }

    /// Reads what the socket has; false if the connection broke.
    pub(crate) fn consume_input(&mut self) -> bool {
        // SAFETY: `raw` is a live PGconn; PQconsumeInput does not block.
        unsafe { PQconsumeInput(self.raw.as_ptr()) == 1 }
    }

    pub(crate) fn is_busy(&mut self) -> bool {
        // SAFETY: `raw` is a live PGconn.
        unsafe { PQisBusy(self.raw.as_ptr()) == 1 }
    }

    /// The next result, if one is ready (callers check `is_busy` first); `None` marks the
    /// end of one statement's results.
    pub(crate) fn next_result(&mut self) -> Option<ResultKind> {
        // SAFETY: `raw` is a live PGconn; the result is read and then freed with PQclear.
        unsafe {
            let result = PQgetResult(self.raw.as_ptr());
            if result.is_null() {
                return None;
            }
            let kind = match PQresultStatus(result) {
                ExecStatusType::PGRES_PIPELINE_SYNC => ResultKind::PipelineSync,
                ExecStatusType::PGRES_PIPELINE_ABORTED => ResultKind::PipelineAborted,
                ExecStatusType::PGRES_FATAL_ERROR | ExecStatusType::PGRES_BAD_RESPONSE => {
                    let message = CStr::from_ptr(PQresultErrorMessage(result));
                    ResultKind::Error(message.to_string_lossy().trim_end().to_string())
                }
                _ => ResultKind::Ok,
            };
            PQclear(result);
            Some(kind)
        }
    }

    /// The next notification consume_input collected, copied out of libpq.
    pub(crate) fn next_notification(&mut self) -> Option<Notification> {
        // SAFETY: PQnotifies returns NULL or a malloc'd PGnotify whose `extra` is a
        // NUL-terminated string; we copy it and free the whole struct with PQfreemem.
        unsafe {
            let notify = PQnotifies(self.raw.as_ptr());
            if notify.is_null() {
                return None;
            }
            let notification = Notification {
                sender_pid: (*notify).be_pid,
                payload: CStr::from_ptr((*notify).extra).to_bytes().to_vec(),
            };
            PQfreemem(notify.cast());
            Some(notification)
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: `raw` is a live PGconn, finished exactly once here; PQfinish closes its
        // socket (ours, never a host fd) and frees it.
        unsafe { PQfinish(self.raw.as_ptr()) };
    }
}

/// A NUL-terminated copy of `text`, or `None` if it contains a NUL.
pub(crate) fn c_string(text: &str) -> Option<CString> {
    CString::new(text).ok()
}
