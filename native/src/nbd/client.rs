//! `NbdClient`: a cheap, cloneable handle on one NBD connection.
//!
//! Every method checks its arguments against what the handshake learned (export size, block
//! sizes, transmission flags, negotiated contexts) before anything is sent: a request the
//! server is bound to refuse fails here with `invalid_argument` or `unsupported`, with a message
//! naming the problem, and the connection stays usable.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use super::codec::*;
use super::connection::{Command, Connection, Expect, Mode, Reply};
use super::handshake;
use super::info::ExportInfo;
use super::uri::{NbdAddress, NbdUri};
use crate::buffer::ReadBuffer;
use crate::error::{Error, Result};
use crate::source::Extent;

/// QEMU serves at most 16 requests at once per client; more would only queue on its side.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;

/// How long connecting and the handshake may take. A server sends its greeting as soon as it
/// accepts, so a socket that stays silent this long is not an NBD server (a guest agent's or an
/// HTTP socket given by mistake), or a server that takes no more clients: an error then, not a
/// copy that hangs.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request may wait for its reply once sent. Generous: QEMU answers within
/// milliseconds even from network storage, and a busy server with 16 requests queued within
/// seconds; a server that stays silent this long has hung, and a copy must fail, not wait until
/// someone kills it.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub uri: NbdUri,
    /// Meta contexts to negotiate (`base:allocation`, `qemu:dirty-bitmap:NAME`, ...).
    pub meta_contexts: Vec<String>,
    /// Request extended (64-bit) headers; used only if the server offers them.
    pub extended_headers: bool,
    /// Requests in flight at once on this connection; further ones wait.
    pub max_in_flight: usize,
    /// Limit on connecting plus the handshake.
    pub handshake_timeout: Duration,
    /// Longest wait for a request's reply once sent; `None` waits forever. A request that
    /// times out fails with `ERR_NBD_TIMEOUT` naming it, and so does every request then
    /// pending: the connection is closed.
    pub request_timeout: Option<Duration>,
}

impl ConnectOptions {
    pub fn new(uri: NbdUri) -> Self {
        ConnectOptions {
            uri,
            meta_contexts: Vec::new(),
            extended_headers: true,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
        }
    }
}

struct Inner {
    conn: Connection,
    info: ExportInfo,
}

/// Handle on one NBD connection. Clones share the connection; requests from all clones are
/// pipelined. Dropping the last clone closes the connection.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("info", &self.inner.info)
            .finish()
    }
}

fn connect_error(uri: &NbdUri, e: std::io::Error) -> Error {
    Error::io(format!("connecting to {uri}"), e)
}

/// Runs `handshake` (connecting included) under `limit`.
async fn within<T>(
    uri: &NbdUri,
    limit: Duration,
    handshake: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, handshake).await {
        Ok(r) => r,
        Err(_) => Err(connect_error(
            uri,
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no NBD handshake within {limit:?}: not an NBD server, or one that takes no more clients"
                ),
            ),
        )),
    }
}

impl NbdClient {
    /// Connects to `opts.uri` and negotiates the export, within `opts.handshake_timeout`.
    pub async fn connect(opts: &ConnectOptions) -> Result<NbdClient> {
        if opts.handshake_timeout.is_zero() {
            return Err(Error::invalid_argument(
                "handshake_timeout must be positive",
            ));
        }
        within(&opts.uri, opts.handshake_timeout, async {
            match &opts.uri.address {
                NbdAddress::Tcp { host, port } => {
                    let s = TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(|e| connect_error(&opts.uri, e))?;
                    // Request headers are small and latency matters more than packet count.
                    let _ = s.set_nodelay(true);
                    Self::connect_stream(s, opts).await
                }
                NbdAddress::Unix { path } => {
                    let s = UnixStream::connect(path)
                        .await
                        .map_err(|e| connect_error(&opts.uri, e))?;
                    Self::connect_stream(s, opts).await
                }
            }
        })
        .await
    }

    /// Negotiates over an already connected stream (`opts.uri` only supplies the export name).
    pub async fn connect_stream<S>(mut stream: S, opts: &ConnectOptions) -> Result<NbdClient>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        if opts.max_in_flight == 0 {
            return Err(Error::invalid_argument("max_in_flight must be at least 1"));
        }
        let info = handshake::negotiate(
            &mut stream,
            &opts.uri.export,
            &opts.meta_contexts,
            opts.extended_headers,
        )
        .await?;
        let mode = Mode {
            structured: info.structured_replies,
            extended: info.extended_headers,
            contexts: info.meta_contexts.iter().map(|c| c.id).collect(),
        };
        let conn = Connection::start(
            stream,
            mode,
            opts.max_in_flight,
            opts.request_timeout.filter(|t| !t.is_zero()),
        );
        Ok(NbdClient {
            inner: Arc::new(Inner { conn, info }),
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    fn check_range(&self, command: &str, offset: u64, length: u64) -> Result<()> {
        let info = &self.inner.info;
        if length == 0 {
            return Err(Error::invalid_argument(format!(
                "{command} of length 0 at offset {offset}"
            )));
        }
        match offset.checked_add(length) {
            Some(end) if end <= info.size => Ok(()),
            _ => Err(Error::invalid_argument(format!(
                "{command} at offset {offset} length {length} extends beyond the end of export {:?} ({} bytes)",
                info.name, info.size
            ))),
        }
    }

    fn check_payload(&self, command: &str, length: u64) -> Result<()> {
        let max = self.inner.info.block_sizes.maximum;
        if length > u64::from(max) {
            return Err(Error::invalid_argument(format!(
                "{command} length {length} exceeds the server's maximum block size {max}"
            )));
        }
        Ok(())
    }

    /// Without extended headers a request length is 32 bits wide.
    fn check_len32(&self, command: &str, length: u64) -> Result<()> {
        if !self.inner.info.extended_headers && length > u64::from(u32::MAX) {
            return Err(Error::invalid_argument(format!(
                "{command} length {length} exceeds {}, the limit without extended headers",
                u32::MAX
            )));
        }
        Ok(())
    }

    fn check_writable(&self, command: &str) -> Result<()> {
        if self.inner.info.read_only() {
            return Err(Error::unsupported(format!(
                "{command} on read-only export {:?}",
                self.inner.info.name
            )));
        }
        Ok(())
    }

    fn check_flag(&self, ok: bool, what: &str) -> Result<()> {
        if !ok {
            return Err(Error::unsupported(format!(
                "server does not support {what} on export {:?}",
                self.inner.info.name
            )));
        }
        Ok(())
    }

    async fn simple(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<Bytes>,
    ) -> Result<()> {
        let cmd = Command {
            command,
            flags,
            offset,
            length,
            payload,
            expect: Expect::Nothing,
        };
        match self.inner.conn.submit(cmd).await? {
            Reply::Done => Ok(()),
            other => Err(Error::protocol(format!(
                "unexpected reply {other:?} to {}",
                command_name(command)
            ))),
        }
    }

    /// Reads `length` bytes at `offset`; holes read as zeros.
    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes> {
        let buf = ReadBuffer::new(length as usize)?;
        let filled = self.read_into(offset, length, buf, 0).await?.freeze();
        filled
            .slice(0, length as usize)
            .ok_or_else(|| Error::protocol("READ reply did not fill the buffer"))
    }

    /// Reads `length` bytes at `offset` into `buf` at `at`, without copying, and gives the
    /// buffer back with that range recorded as filled. On failure the buffer is dropped.
    pub async fn read_into(
        &self,
        offset: u64,
        length: u32,
        buf: ReadBuffer,
        at: usize,
    ) -> Result<ReadBuffer> {
        let length = u64::from(length);
        self.check_range("READ", offset, length)?;
        self.check_payload("READ", length)?;
        if at
            .checked_add(length as usize)
            .is_none_or(|end| end > buf.len())
        {
            return Err(Error::invalid_argument(format!(
                "READ of {length} bytes does not fit a {} byte buffer at {at}",
                buf.len()
            )));
        }
        let cmd = Command {
            command: CMD_READ,
            flags: 0,
            offset,
            length,
            payload: None,
            expect: Expect::Data { buf, at },
        };
        match self.inner.conn.submit(cmd).await? {
            Reply::Data(b) => Ok(b),
            other => Err(Error::protocol(format!(
                "unexpected reply {other:?} to READ"
            ))),
        }
    }

    /// Writes `data` at `offset`; with `fua`, the server persists it before replying.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let length = data.len() as u64;
        self.check_writable("WRITE")?;
        if fua {
            self.check_flag(self.inner.info.can_fua(), "FUA")?;
        }
        self.check_range("WRITE", offset, length)?;
        self.check_payload("WRITE", length)?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.simple(CMD_WRITE, flags, offset, length, Some(data))
            .await
    }

    /// Makes the range read as zeros; with `may_trim` the server may punch a hole instead of
    /// writing zeros (without it, NO_HOLE asks it to keep the range allocated).
    pub async fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool) -> Result<()> {
        self.check_writable("WRITE_ZEROES")?;
        self.check_flag(self.inner.info.can_write_zeroes(), "WRITE_ZEROES")?;
        self.check_range("WRITE_ZEROES", offset, length)?;
        self.check_len32("WRITE_ZEROES", length)?;
        let flags = if may_trim { 0 } else { CMD_FLAG_NO_HOLE };
        self.simple(CMD_WRITE_ZEROES, flags, offset, length, None)
            .await
    }

    /// Discards the range (contents become unspecified).
    pub async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.check_flag(self.inner.info.can_trim(), "TRIM")?;
        self.check_writable("TRIM")?;
        self.check_range("TRIM", offset, length)?;
        self.check_len32("TRIM", length)?;
        self.simple(CMD_TRIM, 0, offset, length, None).await
    }

    /// Persists every write the server has replied to.
    pub async fn flush(&self) -> Result<()> {
        self.check_flag(self.inner.info.can_flush(), "FLUSH")?;
        self.simple(CMD_FLUSH, 0, 0, 0, None).await
    }

    /// One BLOCK_STATUS request for one context, normalised: extents are contiguous, start at
    /// `offset`, are clipped to offset+length, at least one extent; a shorter answer is fine
    /// (the caller loops, or uses [`NbdClient::block_status_all`]).
    pub async fn block_status(
        &self,
        offset: u64,
        length: u64,
        context: &str,
    ) -> Result<Vec<Extent>> {
        let info = &self.inner.info;
        let context_id = info.context_id(context).ok_or_else(|| {
            Error::unsupported(format!(
                "meta context {context:?} was not negotiated with export {:?}",
                info.name
            ))
        })?;
        self.check_range("BLOCK_STATUS", offset, length)?;
        // A shorter request is allowed to get a shorter answer, so clamp instead of failing;
        // 2^32 - minimum keeps the length aligned to the minimum block size (a power of two).
        let length = if info.extended_headers {
            length
        } else {
            length.min((1u64 << 32) - u64::from(info.block_sizes.minimum))
        };
        let cmd = Command {
            command: CMD_BLOCK_STATUS,
            flags: 0,
            offset,
            length,
            payload: None,
            expect: Expect::BlockStatus { context_id },
        };
        match self.inner.conn.submit(cmd).await? {
            Reply::Extents(descriptors) => Ok(normalise(offset, length, &descriptors)),
            other => Err(Error::protocol(format!(
                "unexpected reply {other:?} to BLOCK_STATUS"
            ))),
        }
    }

    /// Loops [`NbdClient::block_status`] until [offset, offset+length) is covered; merges
    /// adjacent extents with equal flags.
    pub async fn block_status_all(
        &self,
        offset: u64,
        length: u64,
        context: &str,
    ) -> Result<Vec<Extent>> {
        self.check_range("BLOCK_STATUS", offset, length)?;
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            for e in self.block_status(pos, end - pos, context).await? {
                pos = e.offset + e.length;
                match out.last_mut() {
                    Some(last) if last.flags == e.flags => last.length += e.length,
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Sends NBD_CMD_DISC and closes the connection; later calls on any clone fail with
    /// `closed`. Requests still in flight get their replies if the server sends them first.
    pub async fn disconnect(&self) -> Result<()> {
        self.inner.conn.disconnect().await
    }
}

/// Turns descriptors into absolute extents starting at `offset`, clipped to offset+length.
/// The connection guarantees at least one descriptor and no zero lengths, so the result is
/// never empty and always makes progress.
fn normalise(offset: u64, length: u64, descriptors: &[BlockDescriptor]) -> Vec<Extent> {
    let end = offset + length;
    let mut pos = offset;
    let mut out = Vec::with_capacity(descriptors.len());
    for d in descriptors {
        if pos >= end {
            break;
        }
        let len = d.length.min(end - pos);
        out.push(Extent {
            offset: pos,
            length: len,
            flags: d.flags,
        });
        pos += len;
    }
    out
}

/// Lists the meta contexts of `uri`'s export matching `queries` (e.g. `["qemu:dirty-bitmap:"]`
/// lists the dirty bitmaps), on a short-lived connection of its own.
pub async fn list_meta_contexts(uri: &NbdUri, queries: &[String]) -> Result<Vec<String>> {
    within(uri, DEFAULT_HANDSHAKE_TIMEOUT, async {
        match &uri.address {
            NbdAddress::Tcp { host, port } => {
                let mut s = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| connect_error(uri, e))?;
                handshake::list_meta_contexts(&mut s, &uri.export, queries).await
            }
            NbdAddress::Unix { path } => {
                let mut s = UnixStream::connect(path)
                    .await
                    .map_err(|e| connect_error(uri, e))?;
                handshake::list_meta_contexts(&mut s, &uri.export, queries).await
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_clips_and_starts_at_offset() {
        let d = |length, flags| BlockDescriptor { length, flags };
        assert_eq!(
            normalise(100, 1000, &[d(400, 0), d(10_000, 3), d(5, 1)]),
            vec![
                Extent {
                    offset: 100,
                    length: 400,
                    flags: 0
                },
                Extent {
                    offset: 500,
                    length: 600,
                    flags: 3
                }
            ]
        );
        assert_eq!(
            normalise(0, 4096, &[d(512, 1)]),
            vec![Extent {
                offset: 0,
                length: 512,
                flags: 1
            }]
        );
    }
}
