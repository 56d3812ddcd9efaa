//! The one error type of the native core.
//!
//! Opaque, with a private kind (as tokio-postgres does): callers ask for a stable [`Error::code`]
//! and for the typed details of a server error, never match on internals. `Display` is lowercase
//! and appends `": cause"` for a wrapped source.

use std::fmt;

type Source = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The socket or a local file failed.
    Io,
    /// The peer broke the NBD protocol (bad magic, unknown cookie, oversize length...).
    Protocol,
    /// The server answered a command with an NBD error.
    Server,
    /// The connection is gone; every pending request fails with this.
    Closed,
    /// The caller's AbortSignal fired.
    Cancelled,
    /// A bad URI, option or range from the caller.
    InvalidArgument,
    /// The server does not offer what was asked for (a meta context, TRIM, ...).
    Unsupported,
    /// The sink (file, qcow2, JS consumer) failed.
    Sink,
    /// The server did not answer a request within the request timeout.
    Timeout,
    /// Stored data does not match its recorded digests (a backup image, a digest file).
    Corrupt,
    /// The object store does not answer, or keeps failing after retries.
    StoreUnavailable,
    /// The object store refused the credentials or the request (403).
    StoreAccess,
    /// The bucket does not exist.
    StoreNotFound,
    /// The object store refused a write for lack of space (a bucket quota).
    StoreFull,
    /// TLS refused the object store's certificate: not the pinned one, or not trusted.
    StoreCertificate,
    /// The store is encrypted and no key was given.
    KeyRequired,
    /// The key given is not the store's key.
    KeyMismatch,
    /// Stored data of a newer format version than this code reads.
    Version,
}

/// Details of an error reply from an NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// NBD error value as sent on the wire (NBD_EIO = 5, ...).
    pub errno: u32,
    /// The command that failed: `READ`, `WRITE`, `TRIM`, `BLOCK_STATUS`, ...
    pub command: &'static str,
    /// Offset of the failing request, or the offset the server named in an ERROR_OFFSET chunk.
    pub offset: u64,
    /// Length of the failing request.
    pub length: u64,
    /// The server's human-readable message, if it sent one.
    pub message: Option<String>,
}

/// Error of the native core.
pub struct Error {
    kind: Kind,
    message: String,
    server: Option<Box<ServerError>>,
    /// The request that timed out: command, offset, length.
    request: Option<(&'static str, u64, u64)>,
    source: Option<Source>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            server: None,
            request: None,
            source: None,
        }
    }

    fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// An I/O failure while doing `what` (e.g. "reading reply header").
    pub fn io(what: impl Into<String>, err: std::io::Error) -> Self {
        Error::new(Kind::Io, what).with_source(err)
    }

    pub fn protocol(message: impl Into<String>) -> Self {
        Error::new(Kind::Protocol, message)
    }

    pub fn server(details: ServerError) -> Self {
        let mut e = Error::new(
            Kind::Server,
            format!(
                "server error {} on {} at offset {} length {}",
                errno_name(details.errno),
                details.command,
                details.offset,
                details.length
            ),
        );
        if let Some(msg) = details.message.as_deref().filter(|m| !m.is_empty()) {
            e.message.push_str(": ");
            e.message.push_str(msg);
        }
        e.server = Some(Box::new(details));
        e
    }

    pub fn closed(message: impl Into<String>) -> Self {
        Error::new(Kind::Closed, message)
    }

    pub fn cancelled() -> Self {
        Error::new(Kind::Cancelled, "operation cancelled")
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Error::new(Kind::InvalidArgument, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(Kind::Unsupported, message)
    }

    /// The server left `command` at `offset`, `length` unanswered for `after`.
    pub fn timeout(
        command: &'static str,
        offset: u64,
        length: u64,
        after: std::time::Duration,
    ) -> Self {
        let mut e = Error::new(
            Kind::Timeout,
            format!(
                "no reply to {command} at offset {offset} length {length} within {} s",
                after.as_secs_f64()
            ),
        );
        e.request = Some((command, offset, length));
        e
    }

    pub fn sink(message: impl Into<String>) -> Self {
        Error::new(Kind::Sink, message)
    }

    /// Stored data that does not match its digests; `message` names the file and the range.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(Kind::Corrupt, message)
    }

    pub fn store_unavailable(message: impl Into<String>) -> Self {
        Error::new(Kind::StoreUnavailable, message)
    }

    pub fn store_access(message: impl Into<String>) -> Self {
        Error::new(Kind::StoreAccess, message)
    }

    pub fn store_not_found(message: impl Into<String>) -> Self {
        Error::new(Kind::StoreNotFound, message)
    }

    pub fn store_full(message: impl Into<String>) -> Self {
        Error::new(Kind::StoreFull, message)
    }

    pub fn store_certificate(message: impl Into<String>) -> Self {
        Error::new(Kind::StoreCertificate, message)
    }

    pub fn key_required(message: impl Into<String>) -> Self {
        Error::new(Kind::KeyRequired, message)
    }

    pub fn key_mismatch(message: impl Into<String>) -> Self {
        Error::new(Kind::KeyMismatch, message)
    }

    pub fn version(message: impl Into<String>) -> Self {
        Error::new(Kind::Version, message)
    }

    /// Adds the underlying error (an S3 client's, a decoder's) as the cause.
    pub fn caused_by(self, source: impl Into<Source>) -> Self {
        self.with_source(source)
    }

    /// A copy for another caller of an error several share (one chunk fetch awaited by many
    /// reads): the same code and details, the cause's text kept in the message.
    pub fn duplicate(&self) -> Self {
        Error {
            kind: self.kind,
            message: self.to_string(),
            server: self.server.clone(),
            request: self.request,
            source: None,
        }
    }

    /// A sink failure caused by an I/O error.
    pub fn sink_io(what: impl Into<String>, err: std::io::Error) -> Self {
        Error::new(Kind::Sink, what).with_source(err)
    }

    /// Stable code for JavaScript (`err.code`); never changes once released.
    pub fn code(&self) -> &'static str {
        match self.kind {
            Kind::Io => "ERR_NBD_IO",
            Kind::Protocol => "ERR_NBD_PROTOCOL",
            Kind::Server => "ERR_NBD_SERVER",
            Kind::Closed => "ERR_NBD_CLOSED",
            Kind::Cancelled => "ERR_CANCELLED",
            Kind::InvalidArgument => "ERR_INVALID_ARGUMENT",
            Kind::Unsupported => "ERR_NBD_UNSUPPORTED",
            Kind::Sink => "ERR_SINK",
            Kind::Timeout => "ERR_NBD_TIMEOUT",
            Kind::Corrupt => "ERR_BACKUP_CORRUPT",
            Kind::StoreUnavailable => "ERR_STORE_UNAVAILABLE",
            Kind::StoreAccess => "ERR_STORE_ACCESS",
            Kind::StoreNotFound => "ERR_STORE_NOT_FOUND",
            Kind::StoreFull => "ERR_STORE_FULL",
            Kind::StoreCertificate => "ERR_STORE_CERTIFICATE",
            Kind::KeyRequired => "ERR_KEY_REQUIRED",
            Kind::KeyMismatch => "ERR_KEY_MISMATCH",
            Kind::Version => "ERR_BACKUP_VERSION",
        }
    }

    /// The request an error is about (command, offset, length): the one the server failed or
    /// the one that timed out.
    pub fn request(&self) -> Option<(&'static str, u64, u64)> {
        match &self.server {
            Some(s) => Some((s.command, s.offset, s.length)),
            None => self.request,
        }
    }

    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    /// Details when the server answered with an error.
    pub fn server_error(&self) -> Option<&ServerError> {
        self.server.as_deref()
    }

    pub fn is_corrupt(&self) -> bool {
        self.kind == Kind::Corrupt
    }

    pub fn is_cancelled(&self) -> bool {
        self.kind == Kind::Cancelled
    }

    pub fn is_closed(&self) -> bool {
        self.kind == Kind::Closed
    }

    pub fn is_protocol(&self) -> bool {
        self.kind == Kind::Protocol
    }

    pub fn is_unsupported(&self) -> bool {
        self.kind == Kind::Unsupported
    }

    /// True when the server refused a request as invalid (NBD_EINVAL): what a bitmap-restricted
    /// snapshot export answers for block status or reads outside its dirty areas.
    pub fn is_server_einval(&self) -> bool {
        self.server.as_ref().is_some_and(|s| s.errno == NBD_EINVAL)
    }
}

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Name of an NBD error value, as the NBD protocol defines them (errno names).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        NBD_EPERM => "EPERM",
        NBD_EIO => "EIO",
        NBD_ENOMEM => "ENOMEM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        NBD_EOVERFLOW => "EOVERFLOW",
        NBD_ENOTSUP => "ENOTSUP",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "EUNKNOWN",
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("code", &self.code())
            .field("message", &self.message)
            .field("server", &self.server)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| &**s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_error_names_errno_command_offset_and_message() {
        let e = Error::server(ServerError {
            errno: NBD_EIO,
            command: "READ",
            offset: 4096,
            length: 512,
            message: Some("injected".into()),
        });
        assert_eq!(e.code(), "ERR_NBD_SERVER");
        assert_eq!(
            e.to_string(),
            "server error EIO on READ at offset 4096 length 512: injected"
        );
        assert_eq!(e.server_error().map(|s| s.offset), Some(4096));
    }

    #[test]
    fn io_error_appends_cause() {
        let e = Error::io("reading reply header", std::io::Error::other("boom"));
        assert_eq!(e.to_string(), "reading reply header: boom");
        assert_eq!(e.code(), "ERR_NBD_IO");
    }
}
