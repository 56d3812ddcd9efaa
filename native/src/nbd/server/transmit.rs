//! Transmission: requests in, replies out, several in flight per connection.
//!
//! The reader takes one request at a time off the socket; READ and BLOCK_STATUS run as tasks
//! of their own (at most [`MAX_IN_FLIGHT`] per connection, so a slow chunk does not hold up
//! the others) and hand their whole reply to one writer task, which writes replies one after the
//! other: replies never interleave, and may come out of order, as NBD allows. What a request
//! is answered with is decided by the pure functions at the top ([`check`], the encoders),
//! tested without sockets.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::negotiate::{Session, ALLOCATION_CONTEXT_ID, MAX_READ};
use super::{Export, ReadOnlyDisk, ServerLog};
use crate::error::{Error, Result, NBD_EINVAL, NBD_EIO, NBD_EPERM};
use crate::nbd::codec::*;
use crate::source::Extent;

/// Requests served at once per connection (QEMU's client sends at most 16).
pub const MAX_IN_FLIGHT: usize = 16;
/// Largest WRITE payload read (and thrown away) to stay in step; a larger one ends the
/// connection, since nothing after it could be trusted.
const MAX_WRITE_PAYLOAD: u64 = MAX_READ as u64;

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        one: bool,
    },
    /// Answer success at once (FLUSH: nothing is ever written).
    Ok,
    /// Answer this NBD error at once.
    Refuse(u32, &'static str),
    Disconnect,
}

/// Decides what a request gets, from the export's size and the session alone.
pub fn check(req: &Request, size: u64, session: &Session) -> Action {
    let in_bounds = || {
        req.offset
            .checked_add(req.length)
            .is_some_and(|end| end <= size)
    };
    match req.command {
        CMD_READ => {
            if req.length == 0 || req.length > u64::from(MAX_READ) {
                Action::Refuse(NBD_EINVAL, "read length must be 1 to 32 MiB")
            } else if !in_bounds() {
                Action::Refuse(NBD_EINVAL, "read beyond the end of the export")
            } else {
                Action::Read {
                    offset: req.offset,
                    length: req.length as u32,
                }
            }
        }
        CMD_BLOCK_STATUS => {
            if !session.allocation {
                Action::Refuse(NBD_EINVAL, "no meta context was negotiated")
            } else if req.length == 0 || !in_bounds() {
                Action::Refuse(NBD_EINVAL, "block status beyond the end of the export")
            } else {
                Action::BlockStatus {
                    offset: req.offset,
                    length: req.length as u32,
                    one: req.flags & CMD_FLAG_REQ_ONE != 0,
                }
            }
        }
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
            Action::Refuse(NBD_EPERM, "the export is read-only")
        }
        CMD_FLUSH => Action::Ok,
        CMD_DISC => Action::Disconnect,
        _ => Action::Refuse(NBD_EINVAL, "unknown command"),
    }
}

/// `base:allocation` descriptors for `[offset, offset + length)` from a disk's extents: clipped
/// to the range, neighbours with the same flags merged, only the first with `one`
/// (`NBD_CMD_FLAG_REQ_ONE`). `None` when the extents do not start at `offset` (the disk's bug).
pub fn descriptors(
    extents: &[Extent],
    offset: u64,
    length: u32,
    one: bool,
) -> Option<Vec<BlockDescriptor>> {
    let end = offset + u64::from(length);
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut pos = offset;
    for e in extents {
        if pos >= end {
            break;
        }
        let e_end = e.offset + e.length;
        if e.offset > pos || e_end <= pos {
            if e_end <= pos {
                continue;
            }
            return None;
        }
        let run = e_end.min(end) - pos;
        match out.last_mut() {
            Some(last) if last.flags == e.flags => last.length += run,
            _ => out.push(BlockDescriptor {
                length: run,
                flags: e.flags,
            }),
        }
        pos += run;
    }
    if out.is_empty() {
        return None;
    }
    if one {
        out.truncate(1);
    }
    Some(out)
}

/// The reply of a successful READ: a simple reply and the data, or one OFFSET_DATA chunk
/// (header first, the data as it is: not copied).
pub fn read_reply(cookie: u64, offset: u64, data: Bytes, structured: bool) -> Vec<Bytes> {
    let mut head = BytesMut::new();
    if structured {
        encode_chunk_header(
            cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            8 + data.len() as u64,
            false,
            offset,
            &mut head,
        );
        head.put_u64(offset);
    } else {
        encode_simple_reply(0, cookie, &mut head);
    }
    vec![head.freeze(), data]
}

/// A reply without data: success (NONE chunk or a simple reply) or an NBD error with a message.
pub fn status_reply(cookie: u64, error: u32, message: &str, structured: bool) -> Bytes {
    let mut b = BytesMut::new();
    if !structured {
        encode_simple_reply(error, cookie, &mut b);
    } else if error == 0 {
        encode_chunk(cookie, REPLY_FLAG_DONE, &Chunk::None, false, 0, &mut b);
    } else {
        // the message field is 16 bits long
        let mut cut = message.len().min(4096);
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        let message = message[..cut].to_string();
        let chunk = Chunk::Error(ErrorChunk {
            chunk_type: REPLY_TYPE_ERROR,
            error,
            message,
            offset: None,
        });
        encode_chunk(cookie, REPLY_FLAG_DONE, &chunk, false, 0, &mut b);
    }
    b.freeze()
}

/// The reply of a successful BLOCK_STATUS.
pub fn block_status_reply(cookie: u64, extents: Vec<BlockDescriptor>) -> Bytes {
    let mut b = BytesMut::new();
    let chunk = Chunk::BlockStatus {
        context_id: ALLOCATION_CONTEXT_ID,
        extents,
    };
    encode_chunk(cookie, REPLY_FLAG_DONE, &chunk, false, 0, &mut b);
    b.freeze()
}

/// Serves requests on `stream` until the client disconnects, breaks the protocol, or `stop`.
pub(super) async fn serve<D: ReadOnlyDisk>(
    stream: UnixStream,
    export: Arc<Export<D>>,
    session: Session,
    log: ServerLog,
    stop: CancellationToken,
) -> Result<()> {
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Vec<Bytes>>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_replies(wr, rx));
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let result = loop {
        let req = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            req = read_request(&mut rd) => req,
        };
        let req = match req {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        // finished tasks are reaped as we go, so the set stays small
        while tasks.try_join_next().is_some() {}
        let structured = session.structured;
        match check(&req, export.disk.size(), &session) {
            Action::Disconnect => break Ok(()),
            Action::Ok => {
                if tx
                    .send(vec![status_reply(req.cookie, 0, "", structured)])
                    .await
                    .is_err()
                {
                    break Ok(());
                }
            }
            Action::Refuse(errno, why) => {
                if req.command == CMD_WRITE {
                    if req.length > MAX_WRITE_PAYLOAD {
                        break Err(Error::protocol(format!(
                            "WRITE of {} bytes to a read-only export",
                            req.length
                        )));
                    }
                    if let Err(e) = discard(&mut rd, req.length).await {
                        break Err(e);
                    }
                }
                let reply = status_reply(req.cookie, errno, why, structured);
                if tx.send(vec![reply]).await.is_err() {
                    break Ok(());
                }
            }
            action => {
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    break Ok(());
                };
                let (export, tx, log) = (export.clone(), tx.clone(), log.clone());
                tasks.spawn(async move {
                    let reply = answer(&export, &log, req.cookie, action, structured).await;
                    // the writer is gone only when the connection is
                    let _ = tx.send(reply).await;
                    drop(permit);
                });
            }
        }
    };
    if stop.is_cancelled() {
        tasks.abort_all();
    }
    // a disconnecting client still gets the replies of what it sent before
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let _ = writer.await;
    result
}

/// Runs a READ or BLOCK_STATUS against the disk; an error becomes EIO for this request alone,
/// and is logged with what failed (the chunk disk's errors name the chunk).
async fn answer<D: ReadOnlyDisk>(
    export: &Export<D>,
    log: &ServerLog,
    cookie: u64,
    action: Action,
    structured: bool,
) -> Vec<Bytes> {
    let failed = |what: String, e: Error| {
        let message = format!("{what} of export {} failed: {e}", export.name);
        log(&message);
        vec![status_reply(cookie, NBD_EIO, &message, structured)]
    };
    match action {
        Action::Read { offset, length } => match export.disk.read(offset, length).await {
            Ok(data) if data.len() == length as usize => {
                read_reply(cookie, offset, data, structured)
            }
            Ok(data) => failed(
                format!("READ at {offset} length {length}"),
                Error::protocol(format!("the disk returned {} bytes", data.len())),
            ),
            Err(e) => failed(format!("READ at {offset} length {length}"), e),
        },
        Action::BlockStatus {
            offset,
            length,
            one,
        } => {
            let what = format!("BLOCK_STATUS at {offset} length {length}");
            match export.disk.allocation(offset, u64::from(length)).await {
                Ok(extents) => match descriptors(&extents, offset, length, one) {
                    Some(d) => vec![block_status_reply(cookie, d)],
                    None => failed(
                        what,
                        Error::protocol("the disk's extents do not start at the offset"),
                    ),
                },
                Err(e) => failed(what, e),
            }
        }
        _ => vec![status_reply(
            cookie,
            NBD_EINVAL,
            "unexpected request",
            structured,
        )],
    }
}

/// The next request, or `None` when the client closed the connection between requests.
async fn read_request(rd: &mut OwnedReadHalf) -> Result<Option<Request>> {
    let mut hdr = [0u8; COMPACT_REQUEST_LEN];
    let io = |e| Error::io("reading a request", e);
    let n = rd.read(&mut hdr[..4]).await.map_err(io)?;
    if n == 0 {
        return Ok(None);
    }
    rd.read_exact(&mut hdr[n..4]).await.map_err(io)?;
    let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if magic != REQUEST_MAGIC {
        // extended headers were never negotiated: any other magic is a stream out of step
        return Err(Error::protocol(format!("bad request magic 0x{magic:08x}")));
    }
    rd.read_exact(&mut hdr[4..]).await.map_err(io)?;
    Ok(Some(decode_request(&hdr)?.0))
}

/// Reads and drops `n` bytes (a refused WRITE's payload).
async fn discard(rd: &mut OwnedReadHalf, n: u64) -> Result<()> {
    let copied = tokio::io::copy(&mut (&mut *rd).take(n), &mut tokio::io::sink())
        .await
        .map_err(|e| Error::io("reading a refused WRITE's payload", e))?;
    if copied != n {
        return Err(Error::closed(
            "client closed the connection inside a WRITE payload",
        ));
    }
    Ok(())
}

/// Writes each reply whole, in the order they come.
async fn write_replies(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<Bytes>>) {
    while let Some(parts) = rx.recv().await {
        for p in parts {
            if wr.write_all(&p).await.is_err() {
                return;
            }
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{FLAG_HOLE, FLAG_ZERO};

    fn req(command: u16, offset: u64, length: u64, flags: u16) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    const S: Session = Session {
        export: 0,
        structured: true,
        allocation: true,
    };

    #[test]
    fn requests_are_checked_against_size_session_and_read_only() {
        let size = 10 << 20;
        assert_eq!(
            check(&req(CMD_READ, 4096, 512, 0), size, &S),
            Action::Read {
                offset: 4096,
                length: 512
            }
        );
        for bad in [
            req(CMD_READ, 0, 0, 0),
            req(CMD_READ, size - 1, 2, 0),
            req(CMD_READ, u64::MAX, 2, 0),
            req(CMD_READ, 0, u64::from(MAX_READ) + 1, 0),
            req(CMD_BLOCK_STATUS, 0, 0, 0),
            req(CMD_BLOCK_STATUS, size, 1, 0),
            req(CMD_CACHE, 0, 1, 0),
        ] {
            assert!(
                matches!(check(&bad, size, &S), Action::Refuse(NBD_EINVAL, _)),
                "{bad:?}"
            );
        }
        for w in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert!(matches!(
                check(&req(w, 0, 512, 0), size, &S),
                Action::Refuse(NBD_EPERM, _)
            ));
        }
        assert_eq!(check(&req(CMD_FLUSH, 0, 0, 0), size, &S), Action::Ok);
        assert_eq!(check(&req(CMD_DISC, 0, 0, 0), size, &S), Action::Disconnect);
        let no_context = Session {
            allocation: false,
            ..S
        };
        assert!(matches!(
            check(&req(CMD_BLOCK_STATUS, 0, 512, 0), size, &no_context),
            Action::Refuse(NBD_EINVAL, _)
        ));
        assert_eq!(
            check(&req(CMD_BLOCK_STATUS, 0, 512, CMD_FLAG_REQ_ONE), size, &S),
            Action::BlockStatus {
                offset: 0,
                length: 512,
                one: true
            }
        );
    }

    #[test]
    fn descriptors_are_clipped_merged_and_cut_to_one() {
        let e = |offset, length, flags| Extent {
            offset,
            length,
            flags,
        };
        let zero = FLAG_HOLE | FLAG_ZERO;
        let extents = [
            e(0, 100, 0),
            e(100, 100, 0),
            e(200, 100, zero),
            e(300, 100, 0),
        ];
        let d = descriptors(&extents[1..], 150, 200, false).unwrap();
        assert_eq!(
            d,
            vec![
                BlockDescriptor {
                    length: 50,
                    flags: 0
                },
                BlockDescriptor {
                    length: 100,
                    flags: zero
                },
                BlockDescriptor {
                    length: 50,
                    flags: 0
                }
            ]
        );
        let d = descriptors(&extents, 10, 150, false).unwrap();
        assert_eq!(
            d,
            vec![BlockDescriptor {
                length: 150,
                flags: 0
            }]
        );
        assert_eq!(descriptors(&extents, 0, 400, true).unwrap().len(), 1);
        assert_eq!(descriptors(&extents, 0, 400, true).unwrap()[0].length, 200);
        assert!(descriptors(&extents[2..], 150, 10, false).is_none());
        assert!(descriptors(&[], 0, 10, false).is_none());
    }

    #[test]
    fn replies_decode_as_the_client_reads_them() {
        let parts = read_reply(9, 4096, Bytes::from_static(b"abcd"), true);
        let all: Vec<u8> = parts.concat();
        let ReplyHeader::Chunk { header, .. } = decode_reply_header(&all).unwrap() else {
            panic!("not a chunk")
        };
        assert!(header.is_done());
        assert_eq!(
            decode_chunk(header.chunk_type, &all[STRUCTURED_REPLY_LEN..]).unwrap(),
            Chunk::OffsetData {
                offset: 4096,
                data: Bytes::from_static(b"abcd")
            }
        );
        let simple: Vec<u8> = read_reply(9, 0, Bytes::from_static(b"xy"), false).concat();
        assert_eq!(
            decode_reply_header(&simple).unwrap(),
            ReplyHeader::Simple {
                error: 0,
                cookie: 9
            }
        );
        assert_eq!(&simple[SIMPLE_REPLY_LEN..], b"xy");

        let e = status_reply(3, NBD_EIO, &"x".repeat(70_000), true);
        let ReplyHeader::Chunk { header, .. } = decode_reply_header(&e).unwrap() else {
            panic!("not a chunk")
        };
        let Chunk::Error(err) =
            decode_chunk(header.chunk_type, &e[STRUCTURED_REPLY_LEN..]).unwrap()
        else {
            panic!("not an error")
        };
        assert_eq!((err.error, err.message.len()), (NBD_EIO, 4096));
        assert_eq!(
            decode_reply_header(&status_reply(3, NBD_EPERM, "ro", false)).unwrap(),
            ReplyHeader::Simple {
                error: NBD_EPERM,
                cookie: 3
            }
        );
        let b = block_status_reply(
            5,
            vec![BlockDescriptor {
                length: 512,
                flags: 3,
            }],
        );
        let ReplyHeader::Chunk { header, .. } = decode_reply_header(&b).unwrap() else {
            panic!("not a chunk")
        };
        assert_eq!(header.chunk_type, REPLY_TYPE_BLOCK_STATUS);
    }
}
