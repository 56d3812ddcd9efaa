//! The transmission phase: owns the socket after the handshake.
//!
//! Two tasks per connection. The writer takes encoded requests from a channel and writes them
//! one after the other (a WRITE payload right after its header), so a caller whose future is
//! dropped half-way can never leave a torn request on the wire. The reader reads replies and
//! routes them by cookie to the pending request, reading READ payloads straight into that
//! request's buffer. Any protocol violation, I/O error or EOF kills the connection: every
//! pending request fails at once and later requests fail with `closed`, so nothing hangs.
//! A request left unanswered longer than the request timeout kills the connection the same way
//! (an NBD request cannot be withdrawn, and a server that stalls one has stalled the copy).
//!
//! Neither task holds the client side (`Connection`), so dropping the last client handle drops
//! the `Connection`, whose `Drop` cancels both tasks.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::codec::*;
use crate::buffer::ReadBuffer;
use crate::error::{Error, Result, ServerError};

/// Bound on a block status chunk: with 64-bit lengths and 512-byte granularity even a 2 GiB
/// request stays far below; more means a confused server, not a big answer.
const MAX_BLOCK_STATUS_PAYLOAD: u64 = 64 * 1024 * 1024;
/// Error chunk: error(4) + message length(2) + message(<= 64 KiB) + offset(8), plus leeway for
/// error types defined after this client was written.
const MAX_ERROR_PAYLOAD: u64 = 6 + 65535 + 8 + 4096;
/// How long `disconnect` waits for the server to hang up after NBD_CMD_DISC.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the handshake decided about reply formats.
#[derive(Debug, Clone)]
pub(crate) struct Mode {
    pub structured: bool,
    pub extended: bool,
    /// Ids of the negotiated meta contexts; block status for any other id is a violation.
    pub contexts: Vec<u32>,
}

/// What a request expects back.
pub(crate) enum Expect {
    Nothing,
    /// READ: `length` bytes, read into `buf` at `at`.
    Data {
        buf: ReadBuffer,
        at: usize,
    },
    /// BLOCK_STATUS: the extents of this context (chunks for other contexts are dropped).
    BlockStatus {
        context_id: u32,
    },
}

pub(crate) struct Command {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u64,
    pub payload: Option<Bytes>,
    pub expect: Expect,
}

#[derive(Debug)]
pub(crate) enum Reply {
    Done,
    /// The buffer of a READ, with the request's range recorded as filled.
    Data(ReadBuffer),
    Extents(Vec<BlockDescriptor>),
}

/// Why the connection died. Kept as data (not `Error`, which is not `Clone`) so that each
/// pending request, and each later caller, gets its own error.
#[derive(Debug, Clone)]
enum Failure {
    Protocol(String),
    Io(String, std::io::ErrorKind, String),
    Closed(String),
    Timeout {
        command: &'static str,
        offset: u64,
        length: u64,
        after: Duration,
    },
}

impl Failure {
    fn io(what: &str, e: &std::io::Error) -> Failure {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Failure::Closed(format!("server closed the connection while {what}"))
        } else {
            Failure::Io(what.to_string(), e.kind(), e.to_string())
        }
    }

    fn protocol(e: Error) -> Failure {
        Failure::Protocol(e.to_string())
    }

    /// The error of a request that was in flight when the connection died.
    fn error(&self) -> Error {
        match self {
            Failure::Protocol(m) => Error::protocol(m.clone()),
            Failure::Io(what, kind, m) => {
                Error::io(what.clone(), std::io::Error::new(*kind, m.clone()))
            }
            Failure::Closed(m) => Error::closed(m.clone()),
            Failure::Timeout {
                command,
                offset,
                length,
                after,
            } => Error::timeout(command, *offset, *length, *after),
        }
    }

    /// The error of a request made after the connection died. After a timeout it is the
    /// timeout itself, so that whichever request a copy hears from first, it reports the
    /// request the server left unanswered.
    fn later(&self) -> Error {
        match self {
            Failure::Timeout { .. } => self.error(),
            _ => Error::closed(format!("NBD connection is closed: {}", self.error())),
        }
    }
}

/// Body of a pending request, filled in as chunks arrive.
enum Body {
    Nothing,
    /// `covered` holds (start, length) relative to the request, to prove on DONE that the
    /// chunks covered the whole range exactly once.
    /// The request's bytes go to `buf[at..]`, which starts uninitialized (a zero fill would
    /// cost a memset per read); data and holes initialize what they cover, and `finish` marks
    /// the range filled only when `covered` proves every byte was written.
    Data {
        buf: ReadBuffer,
        at: usize,
        covered: Vec<(u64, u64)>,
    },
    BlockStatus {
        context_id: u32,
        extents: Option<Vec<BlockDescriptor>>,
    },
}

struct Pending {
    command: u16,
    offset: u64,
    length: u64,
    body: Body,
    /// First error chunk (a reply may carry several; the first is the most telling).
    error: Option<ServerError>,
    tx: oneshot::Sender<Result<Reply>>,
    /// Released only when the reply is complete, even if the caller gave up earlier: the
    /// server is still working on the request.
    _permit: OwnedSemaphorePermit,
}

impl Pending {
    fn set_error(&mut self, errno: u32, message: Option<String>, offset: Option<u64>) {
        if self.error.is_none() {
            self.error = Some(ServerError {
                errno,
                command: command_name(self.command),
                offset: offset.unwrap_or(self.offset),
                length: self.length,
                message: message.filter(|m| !m.is_empty()),
            });
        }
    }

    fn range_error(&self, what: &str, offset: u64, length: u64) -> Failure {
        Failure::Protocol(format!(
            "server sent {what} [{offset}, {}) outside the {} request [{}, {})",
            offset as u128 + length as u128,
            command_name(self.command),
            self.offset,
            self.offset + self.length
        ))
    }

    /// Checks that [offset, offset+length) lies within the request; returns the start
    /// relative to the request.
    fn relative(&self, what: &str, offset: u64, length: u64) -> std::result::Result<u64, Failure> {
        let inside = offset >= self.offset
            && offset
                .checked_add(length)
                .is_some_and(|end| end <= self.offset + self.length);
        if inside {
            Ok(offset - self.offset)
        } else {
            Err(self.range_error(what, offset, length))
        }
    }

    fn wrong_chunk(&self, chunk_type: u16) -> Failure {
        Failure::Protocol(format!(
            "server sent a {} chunk in reply to {}",
            chunk_type_name(chunk_type),
            command_name(self.command)
        ))
    }

    /// The reply is complete: hand the result to the caller. A READ whose chunks did not
    /// cover the range exactly once is a protocol violation, returned so the reader can
    /// close the connection.
    fn finish(self) -> Option<Failure> {
        let (result, failure) = match self.error {
            Some(e) => (Err(Error::server(e)), None),
            None => match self.body {
                Body::Nothing => (Ok(Reply::Done), None),
                Body::Data {
                    mut buf,
                    at,
                    mut covered,
                } => {
                    match check_coverage(&mut covered, self.offset, self.length) {
                        Ok(()) => {
                            // SAFETY: the chunks covered the request exactly once (checked just
                            // above), and each chunk initialized the bytes it covered.
                            unsafe { buf.mark_filled(at, self.length as usize) };
                            (Ok(Reply::Data(buf)), None)
                        }
                        Err(m) => (Err(Error::protocol(m.clone())), Some(Failure::Protocol(m))),
                    }
                }
                Body::BlockStatus {
                    extents: Some(e), ..
                } => (Ok(Reply::Extents(e)), None),
                Body::BlockStatus {
                    extents: None,
                    context_id,
                } => {
                    let m = format!("server finished BLOCK_STATUS without extents for meta context id {context_id}");
                    (Err(Error::protocol(m.clone())), Some(Failure::Protocol(m)))
                }
            },
        };
        // The caller may have stopped waiting; that is fine.
        let _ = self.tx.send(result);
        failure
    }
}

fn check_coverage(
    covered: &mut [(u64, u64)],
    offset: u64,
    length: u64,
) -> std::result::Result<(), String> {
    covered.sort_unstable();
    let mut pos = 0u64;
    for &(start, len) in covered.iter() {
        if start < pos {
            return Err(format!(
                "server sent overlapping READ chunks at offset {}",
                offset + start
            ));
        }
        if start > pos {
            break;
        }
        pos = start + len;
    }
    if pos != length {
        return Err(format!(
            "server's READ reply left [{}, {}) of the request [{offset}, {}) without data",
            offset + pos,
            covered
                .iter()
                .map(|&(s, _)| s)
                .find(|&s| s > pos)
                .map_or(offset + length, |s| offset + s),
            offset + length
        ));
    }
    Ok(())
}

struct Inner {
    pending: HashMap<u64, Pending>,
    /// Set once no new request may be sent (connection died or client disconnected).
    closed: Option<Failure>,
    /// Set once the reader or writer stopped: nothing will ever complete a pending request.
    dead: bool,
}

/// State shared by the client side and both tasks.
struct Shared {
    inner: Mutex<Inner>,
    shutdown: CancellationToken,
    permits: Arc<Semaphore>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map inconsistent in a way that
        // matters more than failing requests; never propagate poisoning as a panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kills the connection: every pending request fails with `failure`, later ones with
    /// `closed`. Idempotent; the first reason sticks for later callers.
    fn fail(&self, failure: Failure) {
        let drained: Vec<Pending> = {
            let mut inner = self.lock();
            inner.dead = true;
            inner.closed.get_or_insert_with(|| failure.clone());
            inner.pending.drain().map(|(_, p)| p).collect()
        };
        for p in drained {
            let _ = p.tx.send(Err(failure.error()));
        }
        self.permits.close();
        self.shutdown.cancel();
    }

    fn take(&self, cookie: u64) -> Option<Pending> {
        self.lock().pending.remove(&cookie)
    }

    /// Returns a partly answered request to the map, unless the connection died meanwhile.
    fn put_back(&self, cookie: u64, p: Pending) {
        let mut inner = self.lock();
        if inner.dead {
            let err = inner
                .closed
                .as_ref()
                .map_or_else(|| Error::closed("NBD connection is closed"), Failure::later);
            drop(inner);
            let _ = p.tx.send(Err(err));
        } else {
            inner.pending.insert(cookie, p);
        }
    }

    fn closed_error(&self) -> Error {
        self.lock()
            .closed
            .as_ref()
            .map_or_else(|| Error::closed("NBD connection is closed"), Failure::later)
    }
}

enum Outgoing {
    Request {
        header: BytesMut,
        payload: Option<Bytes>,
    },
    /// NBD_CMD_DISC: write it, then shut the write side down.
    Disconnect { header: BytesMut },
}

pub(crate) struct Connection {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Outgoing>,
    next_cookie: AtomicU64,
    extended: bool,
    /// Longest wait for a request's reply once sent; `None` waits forever.
    request_timeout: Option<Duration>,
}

impl Connection {
    /// Takes over `stream` after a successful handshake and starts the reader and writer.
    pub(crate) fn start<S>(
        stream: S,
        mode: Mode,
        max_in_flight: usize,
        request_timeout: Option<Duration>,
    ) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                pending: HashMap::new(),
                closed: None,
                dead: false,
            }),
            shutdown: CancellationToken::new(),
            permits: Arc::new(Semaphore::new(max_in_flight)),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let extended = mode.extended;
        let reader = Reader {
            r: BufReader::with_capacity(64 * 1024, r),
            shared: shared.clone(),
            mode,
        };
        tokio::spawn(reader.run());
        tokio::spawn(write_loop(w, rx, shared.clone()));
        Connection {
            shared,
            tx,
            next_cookie: AtomicU64::new(1),
            extended,
            request_timeout,
        }
    }

    /// Encodes a request header under a fresh cookie.
    fn encode(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
    ) -> Result<(u64, BytesMut)> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let mut header = BytesMut::new();
        encode_request(
            &Request {
                flags,
                command,
                cookie,
                offset,
                length,
            },
            self.extended,
            &mut header,
        )?;
        Ok((cookie, header))
    }

    /// Sends one request and waits for its complete reply.
    pub(crate) async fn submit(&self, cmd: Command) -> Result<Reply> {
        let permit = self
            .shared
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.shared.closed_error())?;
        let (cookie, header) = self.encode(cmd.command, cmd.flags, cmd.offset, cmd.length)?;
        let body = match cmd.expect {
            Expect::Nothing => Body::Nothing,
            Expect::Data { buf, at } => Body::Data {
                buf,
                at,
                covered: Vec::new(),
            },
            Expect::BlockStatus { context_id } => Body::BlockStatus {
                context_id,
                extents: None,
            },
        };
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            command: cmd.command,
            offset: cmd.offset,
            length: cmd.length,
            body,
            error: None,
            tx,
            _permit: permit,
        };
        {
            // Register before sending, under the lock, so that the reader always finds the
            // cookie and a concurrent failure either sees this request or refuses it.
            let mut inner = self.shared.lock();
            if let Some(f) = &inner.closed {
                return Err(f.later());
            }
            inner.pending.insert(cookie, pending);
            if self
                .tx
                .send(Outgoing::Request {
                    header,
                    payload: cmd.payload,
                })
                .is_err()
            {
                inner.pending.remove(&cookie);
                return Err(Error::closed("NBD connection is closed: writer stopped"));
            }
        }
        let mut rx = rx;
        if let Some(limit) = self.request_timeout {
            match tokio::time::timeout(limit, &mut rx).await {
                Ok(reply) => return reply.unwrap_or_else(|_| Err(self.shared.closed_error())),
                // Fails this request and every other pending one with the timeout, unless the
                // reply won the race (then it is already in `rx`).
                Err(_) => self.shared.fail(Failure::Timeout {
                    command: command_name(cmd.command),
                    offset: cmd.offset,
                    length: cmd.length,
                    after: limit,
                }),
            }
        }
        rx.await.unwrap_or_else(|_| Err(self.shared.closed_error()))
    }

    /// NBD_CMD_DISC, then wait (bounded) for the server to hang up. Requests still in flight
    /// get their replies if the server sends them before closing.
    pub(crate) async fn disconnect(&self) -> Result<()> {
        let (_, header) = self.encode(CMD_DISC, 0, 0, 0)?;
        {
            let mut inner = self.shared.lock();
            if let Some(f) = &inner.closed {
                return Err(f.later());
            }
            inner.closed = Some(Failure::Closed("the client disconnected".into()));
        }
        if self.tx.send(Outgoing::Disconnect { header }).is_ok() {
            let _ =
                tokio::time::timeout(DISCONNECT_TIMEOUT, self.shared.shutdown.cancelled()).await;
        }
        self.shared
            .fail(Failure::Closed("the client disconnected".into()));
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared
            .fail(Failure::Closed("the client was dropped".into()));
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    let work = async {
        while let Some(out) = rx.recv().await {
            match out {
                Outgoing::Request { header, payload } => {
                    w.write_all(&header).await?;
                    if let Some(p) = payload {
                        w.write_all(&p).await?;
                    }
                    // Batch headers of pipelined requests into one write; flush when idle.
                    if rx.is_empty() {
                        w.flush().await?;
                    }
                }
                Outgoing::Disconnect { header } => {
                    w.write_all(&header).await?;
                    w.flush().await?;
                    w.shutdown().await?;
                    return Ok(());
                }
            }
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        res = work => {
            if let Err(e) = res {
                shared.fail(Failure::io("sending a request", &e));
            }
        }
        _ = shared.shutdown.cancelled() => {}
    }
}

struct Reader<R> {
    r: BufReader<R>,
    shared: Arc<Shared>,
    mode: Mode,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    async fn run(mut self) {
        let shared = self.shared.clone();
        let failure = tokio::select! {
            f = async { loop { if let Err(f) = self.read_reply().await { break f; } } } => f,
            // Whoever cancelled already failed the connection.
            _ = shared.shutdown.cancelled() => return,
        };
        shared.fail(failure);
    }

    async fn read_exact(&mut self, buf: &mut [u8], what: &str) -> std::result::Result<(), Failure> {
        self.r
            .read_exact(buf)
            .await
            .map(drop)
            .map_err(|e| Failure::io(what, &e))
    }

    /// Reads one simple reply or one chunk and routes it.
    async fn read_reply(&mut self) -> std::result::Result<(), Failure> {
        let mut hdr = [0u8; EXTENDED_REPLY_LEN];
        match self.r.read_exact(&mut hdr[..4]).await {
            Ok(_) => {}
            // EOF between replies is the server hanging up, not a torn message.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Failure::Closed("server closed the connection".into()))
            }
            Err(e) => return Err(Failure::io("reading a reply header", &e)),
        }
        let len = reply_header_len(u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]))
            .map_err(Failure::protocol)?;
        self.read_exact(&mut hdr[4..len], "reading a reply header")
            .await?;
        let header = decode_reply_header(&hdr[..len]).map_err(Failure::protocol)?;
        let cookie = header.cookie();
        let mut pending = self.shared.take(cookie).ok_or_else(|| {
            Failure::Protocol(format!("server replied to unknown cookie {cookie}"))
        })?;
        let result = match header {
            ReplyHeader::Simple { error, .. } => {
                self.simple(&mut pending, error).await.map(|()| true)
            }
            ReplyHeader::Chunk { header, extended } => self
                .chunk(&mut pending, &header, extended)
                .await
                .map(|()| header.is_done()),
        };
        match result {
            Ok(true) => match pending.finish() {
                Some(f) => Err(f),
                None => Ok(()),
            },
            Ok(false) => {
                self.shared.put_back(cookie, pending);
                Ok(())
            }
            Err(f) => {
                // Back into the map so that `fail` fails it with everything else.
                self.shared.put_back(cookie, pending);
                Err(f)
            }
        }
    }

    async fn simple(&mut self, p: &mut Pending, error: u32) -> std::result::Result<(), Failure> {
        if self.mode.extended {
            return Err(Failure::Protocol(
                "server sent a simple reply although extended headers were negotiated".into(),
            ));
        }
        if error != 0 {
            // No payload follows an error, not even for READ.
            p.set_error(error, None, None);
            return Ok(());
        }
        let structured = self.mode.structured;
        match &mut p.body {
            Body::Nothing => Ok(()),
            Body::Data { .. } if structured => Err(Failure::Protocol(
                "server sent a simple reply to READ although structured replies were negotiated"
                    .into(),
            )),
            Body::Data { buf, at, covered } => {
                let len = p.length;
                let dst = target(buf, *at, 0, len)?;
                read_exact_uninit(&mut self.r, dst)
                    .await
                    .map_err(|e| Failure::io("reading READ data", &e))?;
                covered.push((0, len));
                Ok(())
            }
            Body::BlockStatus { .. } => Err(Failure::Protocol(
                "server sent a simple reply without extents to BLOCK_STATUS".into(),
            )),
        }
    }

    async fn chunk(
        &mut self,
        p: &mut Pending,
        h: &ChunkHeader,
        extended: bool,
    ) -> std::result::Result<(), Failure> {
        if !self.mode.structured {
            return Err(Failure::Protocol(
                "server sent a structured reply chunk although structured replies were not negotiated".into(),
            ));
        }
        if extended != self.mode.extended {
            return Err(Failure::Protocol(if extended {
                "server sent an extended reply header although extended headers were not negotiated"
                    .into()
            } else {
                "server sent a compact reply chunk although extended headers were negotiated".into()
            }));
        }
        let t = h.chunk_type;
        let limit = match t {
            REPLY_TYPE_NONE => 0,
            REPLY_TYPE_OFFSET_DATA => 8 + p.length,
            REPLY_TYPE_OFFSET_HOLE => 12,
            REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => MAX_BLOCK_STATUS_PAYLOAD,
            t if t & REPLY_TYPE_FLAG_ERROR != 0 => MAX_ERROR_PAYLOAD,
            t => {
                return Err(Failure::Protocol(format!(
                    "server sent unknown reply chunk type {t}"
                )))
            }
        };
        if h.length > limit {
            return Err(Failure::Protocol(format!(
                "server sent an oversize {} chunk of {} bytes (limit {limit}) for {} at offset {} length {}",
                chunk_type_name(t),
                h.length,
                command_name(p.command),
                p.offset,
                p.length
            )));
        }

        if t == REPLY_TYPE_OFFSET_DATA {
            return self.offset_data(p, h.length).await;
        }
        let mut payload = vec![0u8; h.length as usize];
        self.read_exact(&mut payload, "reading a reply chunk")
            .await?;
        match decode_chunk(t, &payload).map_err(Failure::protocol)? {
            Chunk::None => {
                if !h.is_done() {
                    return Err(Failure::Protocol(
                        "server sent a NONE chunk without the DONE flag".into(),
                    ));
                }
                Ok(())
            }
            Chunk::OffsetHole { offset, length } => {
                let start = p.relative("OFFSET_HOLE", offset, u64::from(length))?;
                match &mut p.body {
                    Body::Data { buf, at, covered } => {
                        for b in target(buf, *at, start, u64::from(length))? {
                            b.write(0);
                        }
                        covered.push((start, u64::from(length)))
                    }
                    _ => return Err(p.wrong_chunk(t)),
                }
                Ok(())
            }
            Chunk::BlockStatus {
                context_id,
                extents,
            } => {
                if (t == REPLY_TYPE_BLOCK_STATUS_EXT) != self.mode.extended {
                    return Err(Failure::Protocol(format!(
                        "server sent a {} chunk although extended headers were {}negotiated",
                        chunk_type_name(t),
                        if self.mode.extended { "" } else { "not " }
                    )));
                }
                if !self.mode.contexts.contains(&context_id) {
                    return Err(Failure::Protocol(format!(
                        "server sent block status for meta context id {context_id}, which was never negotiated"
                    )));
                }
                if extents.iter().any(|e| e.length == 0) {
                    return Err(Failure::Protocol(
                        "server sent a block status extent of length 0".into(),
                    ));
                }
                let command = p.command;
                let Body::BlockStatus {
                    context_id: wanted,
                    extents: slot,
                } = &mut p.body
                else {
                    return Err(p.wrong_chunk(t));
                };
                // Servers answer for every negotiated context; keep only the one asked for.
                if context_id == *wanted {
                    if slot.is_some() {
                        return Err(Failure::Protocol(format!(
                            "server sent block status for meta context id {context_id} twice in one {} reply",
                            command_name(command)
                        )));
                    }
                    *slot = Some(extents);
                }
                Ok(())
            }
            Chunk::Error(e) => {
                if let Some(offset) = e.offset {
                    p.relative("an ERROR_OFFSET offset", offset, 1)?;
                }
                p.set_error(e.error, Some(e.message), e.offset);
                Ok(())
            }
            Chunk::OffsetData { .. } => Err(p.wrong_chunk(t)),
        }
    }

    /// OFFSET_DATA: 8-byte offset, then data read straight into the request's buffer.
    async fn offset_data(
        &mut self,
        p: &mut Pending,
        length: u64,
    ) -> std::result::Result<(), Failure> {
        if !matches!(p.body, Body::Data { .. }) {
            return Err(p.wrong_chunk(REPLY_TYPE_OFFSET_DATA));
        }
        if length < 8 {
            return Err(Failure::Protocol(format!(
                "server sent an OFFSET_DATA chunk of only {length} bytes"
            )));
        }
        let mut off = [0u8; 8];
        self.read_exact(&mut off, "reading READ data").await?;
        let offset = u64::from_be_bytes(off);
        let n = length - 8;
        let start = p.relative("OFFSET_DATA", offset, n)?;
        if let Body::Data { buf, at, covered } = &mut p.body {
            let dst = target(buf, *at, start, n)?;
            read_exact_uninit(&mut self.r, dst)
                .await
                .map_err(|e| Failure::io("reading READ data", &e))?;
            covered.push((start, n));
        }
        Ok(())
    }
}

/// Where the bytes `[start, start + n)` of a READ (relative to the request, already checked to
/// lie inside it) go in its buffer.
fn target(
    buf: &mut ReadBuffer,
    at: usize,
    start: u64,
    n: u64,
) -> std::result::Result<&mut [MaybeUninit<u8>], Failure> {
    let len = buf.len();
    let (Ok(start), Ok(n)) = (usize::try_from(start), usize::try_from(n)) else {
        return Err(Failure::Protocol("READ range beyond memory".into()));
    };
    at.checked_add(start)
        .and_then(|from| buf.range_mut(from, n))
        .ok_or_else(|| {
            // `NbdClient::read_into` checks that the request fits; this is a bug guard.
            Failure::Protocol(format!(
                "READ data [{start}, +{n}) does not fit its {len} byte buffer at {at}"
            ))
        })
}

/// `read_exact` into uninitialized memory: fills (initializes) all of `dst` or fails.
async fn read_exact_uninit<R: AsyncRead + Unpin>(
    r: &mut R,
    dst: &mut [MaybeUninit<u8>],
) -> std::io::Result<()> {
    let mut rb = tokio::io::ReadBuf::uninit(dst);
    while rb.remaining() > 0 {
        let before = rb.filled().len();
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut *r).poll_read(cx, &mut rb)).await?;
        if rb.filled().len() == before {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_coverage;

    #[test]
    fn coverage_finds_gaps_and_overlaps() {
        assert!(check_coverage(&mut [(512, 512), (0, 512)], 0, 1024).is_ok());
        let gap = check_coverage(&mut [(0, 512), (1024, 512)], 4096, 1536).unwrap_err();
        assert!(gap.contains("[4608, 5120)"), "{gap}");
        let overlap = check_coverage(&mut [(0, 512), (256, 768)], 0, 1024).unwrap_err();
        assert!(overlap.contains("overlapping"), "{overlap}");
        let short = check_coverage(&mut [(0, 512)], 0, 1024).unwrap_err();
        assert!(short.contains("[512, 1024)"), "{short}");
        assert!(check_coverage(&mut [], 0, 1).is_err());
    }
}
