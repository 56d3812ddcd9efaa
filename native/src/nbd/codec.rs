//! Encoding and decoding of NBD wire messages, with no I/O.
//!
//! Everything here works on byte slices so that it can be tested exhaustively without sockets;
//! `handshake.rs` and `connection.rs` decide how many bytes to read and feed them in. Constants
//! and layouts follow the public NBD protocol specification (`doc/proto.md`). All integers are
//! big-endian on the wire. Server-side encoders (replies, chunks) live here too: the fake
//! servers in the tests use them, and a codec that can produce what it parses is easy to
//! round-trip test.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};

// ---- Handshake -------------------------------------------------------------------------------

/// `NBDMAGIC`, first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation (also prefixes every client option).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle negotiation magic; we refuse oldstyle servers.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

/// Information types in `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Length of an option reply header: magic(8) option(4) type(4) length(4).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of the server greeting: NBDMAGIC(8) IHAVEOPT(8) flags(2).
pub const GREETING_LEN: usize = 18;

// ---- Transmission ----------------------------------------------------------------------------

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Reply flag: last chunk of a structured reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured reply chunk types; error types have bit 15 set.
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

pub const COMPACT_REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const EXTENDED_REPLY_LEN: usize = 32;

/// Name of a command, as used in error messages and [`crate::error::ServerError::command`].
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "UNKNOWN",
    }
}

/// Name of an option, for error messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "NBD_OPT_UNKNOWN",
    }
}

/// Name of an option reply type, for error messages.
pub fn reply_type_name(reply: u32) -> &'static str {
    match reply {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        r if r & REP_FLAG_ERROR != 0 => "NBD_REP_ERR_(unknown)",
        _ => "NBD_REP_(unknown)",
    }
}

/// Name of a structured reply chunk type, for error messages.
pub fn chunk_type_name(chunk_type: u16) -> &'static str {
    match chunk_type {
        REPLY_TYPE_NONE => "NONE",
        REPLY_TYPE_OFFSET_DATA => "OFFSET_DATA",
        REPLY_TYPE_OFFSET_HOLE => "OFFSET_HOLE",
        REPLY_TYPE_BLOCK_STATUS => "BLOCK_STATUS",
        REPLY_TYPE_BLOCK_STATUS_EXT => "BLOCK_STATUS_EXT",
        REPLY_TYPE_ERROR => "ERROR",
        REPLY_TYPE_ERROR_OFFSET => "ERROR_OFFSET",
        t if t & REPLY_TYPE_FLAG_ERROR != 0 => "unknown error type",
        _ => "unknown type",
    }
}

/// Returns a protocol error unless `buf` holds at least `n` more bytes; keeps the `Buf` getters
/// below from panicking on short input.
fn need(buf: &[u8], n: usize, what: &str) -> Result<()> {
    if buf.len() < n {
        return Err(Error::protocol(format!(
            "{what} is truncated: {} bytes where {n} are needed",
            buf.len()
        )));
    }
    Ok(())
}

fn utf8(bytes: &[u8], what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| Error::protocol(format!("{what} is not valid UTF-8")))
}

// ---- Handshake encoding ----------------------------------------------------------------------

/// One client option: `IHAVEOPT`, option, length, data.
pub fn encode_option(option: u32, data: &[u8], dst: &mut BytesMut) {
    dst.reserve(16 + data.len());
    dst.put_u64(IHAVEOPT);
    dst.put_u32(option);
    dst.put_u32(data.len() as u32);
    dst.put_slice(data);
}

/// Data of `NBD_OPT_GO` / `NBD_OPT_INFO`: export name, then the information types requested.
pub fn encode_go_data(export: &str, infos: &[u16]) -> BytesMut {
    let mut d = BytesMut::with_capacity(6 + export.len() + 2 * infos.len());
    d.put_u32(export.len() as u32);
    d.put_slice(export.as_bytes());
    d.put_u16(infos.len() as u16);
    for &i in infos {
        d.put_u16(i);
    }
    d
}

/// Data of `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT`.
pub fn encode_meta_context_data(export: &str, queries: &[String]) -> BytesMut {
    let mut d = BytesMut::new();
    d.put_u32(export.len() as u32);
    d.put_slice(export.as_bytes());
    d.put_u32(queries.len() as u32);
    for q in queries {
        d.put_u32(q.len() as u32);
        d.put_slice(q.as_bytes());
    }
    d
}

/// The server greeting after `NBDMAGIC`: either newstyle with its handshake flags or oldstyle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    Newstyle { flags: u16 },
    Oldstyle,
}

/// Decodes the first 16 bytes (oldstyle is recognised from them) or 18 bytes of the greeting.
pub fn decode_greeting(mut buf: &[u8]) -> Result<Greeting> {
    need(buf, 16, "server greeting")?;
    let magic = buf.get_u64();
    if magic != NBDMAGIC {
        return Err(Error::protocol(format!(
            "not an NBD server: greeting magic 0x{magic:016x} instead of NBDMAGIC"
        )));
    }
    match buf.get_u64() {
        IHAVEOPT => {
            need(buf, 2, "server greeting")?;
            Ok(Greeting::Newstyle {
                flags: buf.get_u16(),
            })
        }
        CLISERV_MAGIC => Ok(Greeting::Oldstyle),
        other => Err(Error::protocol(format!(
            "unknown NBD negotiation magic 0x{other:016x}"
        ))),
    }
}

/// Header of one option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

pub fn decode_option_reply_header(mut buf: &[u8]) -> Result<OptionReplyHeader> {
    need(buf, OPTION_REPLY_HEADER_LEN, "option reply header")?;
    let magic = buf.get_u64();
    if magic != OPTION_REPLY_MAGIC {
        return Err(Error::protocol(format!(
            "bad option reply magic 0x{magic:016x}"
        )));
    }
    Ok(OptionReplyHeader {
        option: buf.get_u32(),
        reply_type: buf.get_u32(),
        length: buf.get_u32(),
    })
}

pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8], dst: &mut BytesMut) {
    dst.put_u64(OPTION_REPLY_MAGIC);
    dst.put_u32(option);
    dst.put_u32(reply_type);
    dst.put_u32(data.len() as u32);
    dst.put_slice(data);
}

/// Payload of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// Name, description or a type this client does not know: ignored.
    Other(u16),
}

pub fn decode_info(mut buf: &[u8]) -> Result<Info> {
    need(buf, 2, "NBD_REP_INFO")?;
    let info_type = buf.get_u16();
    match info_type {
        INFO_EXPORT => {
            if buf.len() != 10 {
                return Err(Error::protocol(format!(
                    "NBD_INFO_EXPORT has {} bytes instead of 12",
                    buf.len() + 2
                )));
            }
            Ok(Info::Export {
                size: buf.get_u64(),
                flags: buf.get_u16(),
            })
        }
        INFO_BLOCK_SIZE => {
            if buf.len() != 12 {
                return Err(Error::protocol(format!(
                    "NBD_INFO_BLOCK_SIZE has {} bytes instead of 14",
                    buf.len() + 2
                )));
            }
            Ok(Info::BlockSize {
                minimum: buf.get_u32(),
                preferred: buf.get_u32(),
                maximum: buf.get_u32(),
            })
        }
        other => Ok(Info::Other(other)),
    }
}

pub fn encode_info(info: &Info, dst: &mut BytesMut) {
    match *info {
        Info::Export { size, flags } => {
            dst.put_u16(INFO_EXPORT);
            dst.put_u64(size);
            dst.put_u16(flags);
        }
        Info::BlockSize {
            minimum,
            preferred,
            maximum,
        } => {
            dst.put_u16(INFO_BLOCK_SIZE);
            dst.put_u32(minimum);
            dst.put_u32(preferred);
            dst.put_u32(maximum);
        }
        Info::Other(t) => dst.put_u16(t),
    }
}

/// Payload of an `NBD_REP_META_CONTEXT` reply: context id and name.
pub fn decode_meta_context(mut buf: &[u8]) -> Result<(u32, String)> {
    need(buf, 4, "NBD_REP_META_CONTEXT")?;
    let id = buf.get_u32();
    Ok((id, utf8(buf, "meta context name")?))
}

pub fn encode_meta_context(id: u32, name: &str, dst: &mut BytesMut) {
    dst.put_u32(id);
    dst.put_slice(name.as_bytes());
}

// ---- Handshake, server side -------------------------------------------------------------------

/// Length of a client option header: `IHAVEOPT`(8) option(4) length(4).
pub const OPTION_HEADER_LEN: usize = 16;

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: u16, dst: &mut BytesMut) {
    dst.put_u64(NBDMAGIC);
    dst.put_u64(IHAVEOPT);
    dst.put_u16(flags);
}

/// Header of a client option: the option and the length of its data.
pub fn decode_option_header(mut buf: &[u8]) -> Result<(u32, u32)> {
    need(buf, OPTION_HEADER_LEN, "option header")?;
    let magic = buf.get_u64();
    if magic != IHAVEOPT {
        return Err(Error::protocol(format!(
            "bad option magic 0x{magic:016x} instead of IHAVEOPT"
        )));
    }
    Ok((buf.get_u32(), buf.get_u32()))
}

/// A length-prefixed (u32) string: an export name or a meta context query.
fn get_string(buf: &mut &[u8], what: &str) -> Result<String> {
    need(buf, 4, what)?;
    let len = buf.get_u32() as usize;
    need(buf, len, what)?;
    let s = utf8(&buf[..len], what)?;
    buf.advance(len);
    Ok(s)
}

/// Decodes the data of `NBD_OPT_GO` / `NBD_OPT_INFO` ([`encode_go_data`]): the export name and
/// the information types requested.
pub fn decode_go_data(mut buf: &[u8]) -> Result<(String, Vec<u16>)> {
    let export = get_string(&mut buf, "export name")?;
    need(buf, 2, "information request count")?;
    let n = usize::from(buf.get_u16());
    if buf.len() != 2 * n {
        return Err(Error::protocol(format!(
            "{n} information requests in {} bytes",
            buf.len()
        )));
    }
    Ok((export, (0..n).map(|_| buf.get_u16()).collect()))
}

/// Decodes the data of `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT`
/// ([`encode_meta_context_data`]): the export name and the queries.
pub fn decode_meta_context_data(mut buf: &[u8]) -> Result<(String, Vec<String>)> {
    let export = get_string(&mut buf, "export name")?;
    need(buf, 4, "meta context query count")?;
    let n = buf.get_u32() as usize;
    // every query takes at least its 4-byte length: a count the data cannot hold is a lie
    if n > buf.len() / 4 {
        return Err(Error::protocol(format!(
            "{n} meta context queries in {} bytes",
            buf.len()
        )));
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(get_string(&mut buf, "meta context query")?);
    }
    if !buf.is_empty() {
        return Err(Error::protocol(format!(
            "{} stray bytes after the meta context queries",
            buf.len()
        )));
    }
    Ok((export, queries))
}

/// The answer to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes unless
/// the client set `NBD_FLAG_C_NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool, dst: &mut BytesMut) {
    dst.put_u64(size);
    dst.put_u16(flags);
    if !no_zeroes {
        dst.put_bytes(0, 124);
    }
}

/// Payload of an `NBD_REP_SERVER` reply (`NBD_OPT_LIST`): the export's name.
pub fn encode_server_entry(name: &str, dst: &mut BytesMut) {
    dst.put_u32(name.len() as u32);
    dst.put_slice(name.as_bytes());
}

// ---- Requests --------------------------------------------------------------------------------

/// A transmission request header. `length` is 64 bits wide; compact headers hold 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

/// Appends the request header (not the WRITE payload). Compact headers cannot carry a length
/// above `u32::MAX`: that is the caller's bug, reported rather than silently truncated.
pub fn encode_request(req: &Request, extended: bool, dst: &mut BytesMut) -> Result<()> {
    if extended {
        dst.reserve(EXTENDED_REQUEST_LEN);
        dst.put_u32(EXTENDED_REQUEST_MAGIC);
    } else {
        if req.length > u64::from(u32::MAX) {
            return Err(Error::invalid_argument(format!(
                "{} length {} does not fit a 32-bit request without extended headers",
                command_name(req.command),
                req.length
            )));
        }
        dst.reserve(COMPACT_REQUEST_LEN);
        dst.put_u32(REQUEST_MAGIC);
    }
    dst.put_u16(req.flags);
    dst.put_u16(req.command);
    dst.put_u64(req.cookie);
    dst.put_u64(req.offset);
    if extended {
        dst.put_u64(req.length);
    } else {
        dst.put_u32(req.length as u32);
    }
    Ok(())
}

/// Length of a request header given its magic (server side).
pub fn request_header_len(magic: u32) -> Result<usize> {
    match magic {
        REQUEST_MAGIC => Ok(COMPACT_REQUEST_LEN),
        EXTENDED_REQUEST_MAGIC => Ok(EXTENDED_REQUEST_LEN),
        m => Err(Error::protocol(format!("bad request magic 0x{m:08x}"))),
    }
}

/// Decodes a complete request header; returns whether it was an extended one.
pub fn decode_request(mut buf: &[u8]) -> Result<(Request, bool)> {
    need(buf, 4, "request header")?;
    let magic = buf.get_u32();
    let len = request_header_len(magic)?;
    need(buf, len - 4, "request header")?;
    let flags = buf.get_u16();
    let command = buf.get_u16();
    let cookie = buf.get_u64();
    let offset = buf.get_u64();
    let extended = magic == EXTENDED_REQUEST_MAGIC;
    let length = if extended {
        buf.get_u64()
    } else {
        u64::from(buf.get_u32())
    };
    Ok((
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        },
        extended,
    ))
}

// ---- Replies ---------------------------------------------------------------------------------

/// Header of a structured (or extended) reply chunk. `offset` is only present in extended
/// headers, where the server echoes the request's offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub offset: Option<u64>,
    pub length: u64,
}

impl ChunkHeader {
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    /// `extended` tells which magic it came with.
    Chunk {
        header: ChunkHeader,
        extended: bool,
    },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple { cookie, .. } => *cookie,
            ReplyHeader::Chunk { header, .. } => header.cookie,
        }
    }
}

/// Total header length (magic included) for a reply starting with `magic`. An unknown magic
/// means the stream is out of sync: nothing after it can be trusted.
pub fn reply_header_len(magic: u32) -> Result<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
        EXTENDED_REPLY_MAGIC => Ok(EXTENDED_REPLY_LEN),
        m => Err(Error::protocol(format!(
            "server sent a reply with bad magic 0x{m:08x}"
        ))),
    }
}

pub fn decode_reply_header(mut buf: &[u8]) -> Result<ReplyHeader> {
    need(buf, 4, "reply header")?;
    let magic = buf.get_u32();
    let len = reply_header_len(magic)?;
    need(buf, len - 4, "reply header")?;
    Ok(match magic {
        SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
            error: buf.get_u32(),
            cookie: buf.get_u64(),
        },
        STRUCTURED_REPLY_MAGIC => {
            let flags = buf.get_u16();
            let chunk_type = buf.get_u16();
            let cookie = buf.get_u64();
            let length = u64::from(buf.get_u32());
            ReplyHeader::Chunk {
                header: ChunkHeader {
                    flags,
                    chunk_type,
                    cookie,
                    offset: None,
                    length,
                },
                extended: false,
            }
        }
        _ => {
            let flags = buf.get_u16();
            let chunk_type = buf.get_u16();
            let cookie = buf.get_u64();
            let offset = buf.get_u64();
            let length = buf.get_u64();
            ReplyHeader::Chunk {
                header: ChunkHeader {
                    flags,
                    chunk_type,
                    cookie,
                    offset: Some(offset),
                    length,
                },
                extended: true,
            }
        }
    })
}

pub fn encode_simple_reply(error: u32, cookie: u64, dst: &mut BytesMut) {
    dst.put_u32(SIMPLE_REPLY_MAGIC);
    dst.put_u32(error);
    dst.put_u64(cookie);
}

/// One block status descriptor: a run of `length` bytes with the context's `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u64,
    pub flags: u64,
}

/// An error chunk (`ERROR`, `ERROR_OFFSET`, or an unknown type with the error bit set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    pub chunk_type: u16,
    pub error: u32,
    pub message: String,
    /// Only for `ERROR_OFFSET`: the offset where the failure happened.
    pub offset: Option<u64>,
}

/// Payload of a structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    OffsetData {
        offset: u64,
        data: Bytes,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    /// `BLOCK_STATUS` (compact, 32-bit lengths and flags) or `BLOCK_STATUS_EXT`.
    BlockStatus {
        context_id: u32,
        extents: Vec<BlockDescriptor>,
    },
    Error(ErrorChunk),
}

/// Decodes the payload of a chunk of type `chunk_type`. `connection.rs` reads OFFSET_DATA
/// straight into the read buffer and only uses this for the other types.
pub fn decode_chunk(chunk_type: u16, mut buf: &[u8]) -> Result<Chunk> {
    match chunk_type {
        REPLY_TYPE_NONE => {
            if !buf.is_empty() {
                return Err(Error::protocol(format!(
                    "NONE chunk with a {} byte payload",
                    buf.len()
                )));
            }
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_DATA => {
            need(buf, 8, "OFFSET_DATA chunk")?;
            let offset = buf.get_u64();
            Ok(Chunk::OffsetData {
                offset,
                data: Bytes::copy_from_slice(buf),
            })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if buf.len() != 12 {
                return Err(Error::protocol(format!(
                    "OFFSET_HOLE chunk has {} bytes instead of 12",
                    buf.len()
                )));
            }
            let offset = buf.get_u64();
            let length = buf.get_u32();
            if length == 0 {
                return Err(Error::protocol("OFFSET_HOLE chunk with zero length"));
            }
            Ok(Chunk::OffsetHole { offset, length })
        }
        REPLY_TYPE_BLOCK_STATUS => {
            // context id, then (length u32, flags u32) pairs; at least one.
            if buf.len() < 12 || !(buf.len() - 4).is_multiple_of(8) {
                return Err(Error::protocol(format!(
                    "BLOCK_STATUS chunk has a malformed length of {} bytes",
                    buf.len()
                )));
            }
            let context_id = buf.get_u32();
            let mut extents = Vec::with_capacity(buf.len() / 8);
            while buf.has_remaining() {
                let length = u64::from(buf.get_u32());
                let flags = u64::from(buf.get_u32());
                extents.push(BlockDescriptor { length, flags });
            }
            Ok(Chunk::BlockStatus {
                context_id,
                extents,
            })
        }
        REPLY_TYPE_BLOCK_STATUS_EXT => {
            // context id, descriptor count, then (length u64, flags u64) pairs.
            need(buf, 8, "BLOCK_STATUS_EXT chunk")?;
            let context_id = buf.get_u32();
            let count = buf.get_u32() as usize;
            if count == 0 || !buf.len().is_multiple_of(16) || buf.len() / 16 != count {
                return Err(Error::protocol(format!(
                    "BLOCK_STATUS_EXT chunk announces {count} descriptors but carries {} bytes",
                    buf.len()
                )));
            }
            let mut extents = Vec::with_capacity(count);
            while buf.has_remaining() {
                extents.push(BlockDescriptor {
                    length: buf.get_u64(),
                    flags: buf.get_u64(),
                });
            }
            Ok(Chunk::BlockStatus {
                context_id,
                extents,
            })
        }
        t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
            // Every error chunk, known or not, starts with error(4) and message length(2), so
            // an unknown error type still yields a usable error.
            need(buf, 6, "error chunk")?;
            let error = buf.get_u32();
            let msg_len = usize::from(buf.get_u16());
            need(buf, msg_len, "error chunk message")?;
            let message = String::from_utf8_lossy(&buf[..msg_len]).into_owned();
            buf.advance(msg_len);
            let offset = if t == REPLY_TYPE_ERROR_OFFSET {
                if buf.len() != 8 {
                    return Err(Error::protocol(format!(
                        "ERROR_OFFSET chunk has {} bytes after its message instead of 8",
                        buf.len()
                    )));
                }
                Some(buf.get_u64())
            } else {
                if t == REPLY_TYPE_ERROR && !buf.is_empty() {
                    return Err(Error::protocol(format!(
                        "ERROR chunk has {} stray bytes after its message",
                        buf.len()
                    )));
                }
                None
            };
            if error == 0 {
                return Err(Error::protocol(format!(
                    "{} chunk with error value 0",
                    chunk_type_name(t)
                )));
            }
            Ok(Chunk::Error(ErrorChunk {
                chunk_type: t,
                error,
                message,
                offset,
            }))
        }
        t => Err(Error::protocol(format!(
            "server sent unknown reply chunk type {t}"
        ))),
    }
}

/// Appends one chunk (header and payload). `extended` picks the extended header (and
/// `BLOCK_STATUS_EXT` for block status); `request_offset` is echoed in extended headers.
pub fn encode_chunk(
    cookie: u64,
    flags: u16,
    chunk: &Chunk,
    extended: bool,
    request_offset: u64,
    dst: &mut BytesMut,
) {
    let mut payload = BytesMut::new();
    let chunk_type = match chunk {
        Chunk::None => REPLY_TYPE_NONE,
        Chunk::OffsetData { offset, data } => {
            payload.put_u64(*offset);
            payload.put_slice(data);
            REPLY_TYPE_OFFSET_DATA
        }
        Chunk::OffsetHole { offset, length } => {
            payload.put_u64(*offset);
            payload.put_u32(*length);
            REPLY_TYPE_OFFSET_HOLE
        }
        Chunk::BlockStatus {
            context_id,
            extents,
        } => {
            payload.put_u32(*context_id);
            if extended {
                payload.put_u32(extents.len() as u32);
                for e in extents {
                    payload.put_u64(e.length);
                    payload.put_u64(e.flags);
                }
                REPLY_TYPE_BLOCK_STATUS_EXT
            } else {
                for e in extents {
                    payload.put_u32(e.length as u32);
                    payload.put_u32(e.flags as u32);
                }
                REPLY_TYPE_BLOCK_STATUS
            }
        }
        Chunk::Error(e) => {
            payload.put_u32(e.error);
            payload.put_u16(e.message.len() as u16);
            payload.put_slice(e.message.as_bytes());
            if let Some(o) = e.offset {
                payload.put_u64(o);
            }
            e.chunk_type
        }
    };
    encode_chunk_header(
        cookie,
        flags,
        chunk_type,
        payload.len() as u64,
        extended,
        request_offset,
        dst,
    );
    dst.put_slice(&payload);
}

/// Appends only a chunk header; lets tests send lying lengths.
pub fn encode_chunk_header(
    cookie: u64,
    flags: u16,
    chunk_type: u16,
    length: u64,
    extended: bool,
    request_offset: u64,
    dst: &mut BytesMut,
) {
    if extended {
        dst.put_u32(EXTENDED_REPLY_MAGIC);
        dst.put_u16(flags);
        dst.put_u16(chunk_type);
        dst.put_u64(cookie);
        dst.put_u64(request_offset);
        dst.put_u64(length);
    } else {
        dst.put_u32(STRUCTURED_REPLY_MAGIC);
        dst.put_u16(flags);
        dst.put_u16(chunk_type);
        dst.put_u64(cookie);
        dst.put_u32(length as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_round_trip(chunk: Chunk, extended: bool) {
        let mut buf = BytesMut::new();
        encode_chunk(42, REPLY_FLAG_DONE, &chunk, extended, 4096, &mut buf);
        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let hlen = reply_header_len(magic).unwrap();
        let header = decode_reply_header(&buf[..hlen]).unwrap();
        let ReplyHeader::Chunk {
            header,
            extended: ext,
        } = header
        else {
            panic!("not a chunk")
        };
        assert_eq!(ext, extended);
        assert_eq!(header.cookie, 42);
        assert!(header.is_done());
        assert_eq!(header.offset, extended.then_some(4096));
        assert_eq!(header.length as usize, buf.len() - hlen);
        assert_eq!(
            decode_chunk(header.chunk_type, &buf[hlen..]).unwrap(),
            chunk
        );
    }

    #[test]
    fn every_chunk_type_round_trips_compact_and_extended() {
        for extended in [false, true] {
            chunk_round_trip(Chunk::None, extended);
            chunk_round_trip(
                Chunk::OffsetData {
                    offset: 8192,
                    data: Bytes::from_static(b"abc"),
                },
                extended,
            );
            chunk_round_trip(
                Chunk::OffsetHole {
                    offset: 512,
                    length: 1024,
                },
                extended,
            );
            chunk_round_trip(
                Chunk::BlockStatus {
                    context_id: 7,
                    extents: vec![
                        BlockDescriptor {
                            length: 4096,
                            flags: 3,
                        },
                        BlockDescriptor {
                            length: 512,
                            flags: 0,
                        },
                    ],
                },
                extended,
            );
            for (t, offset) in [
                (REPLY_TYPE_ERROR, None),
                (REPLY_TYPE_ERROR_OFFSET, Some(1234)),
            ] {
                chunk_round_trip(
                    Chunk::Error(ErrorChunk {
                        chunk_type: t,
                        error: 5,
                        message: "bad".into(),
                        offset,
                    }),
                    extended,
                );
            }
        }
    }

    #[test]
    fn extended_block_status_carries_64_bit_lengths() {
        let big = BlockDescriptor {
            length: 1 << 40,
            flags: 1 << 33,
        };
        chunk_round_trip(
            Chunk::BlockStatus {
                context_id: 1,
                extents: vec![big],
            },
            true,
        );
        let mut buf = BytesMut::new();
        encode_chunk(
            1,
            0,
            &Chunk::BlockStatus {
                context_id: 1,
                extents: vec![big],
            },
            true,
            0,
            &mut buf,
        );
        assert_eq!(
            u16::from_be_bytes([buf[6], buf[7]]),
            REPLY_TYPE_BLOCK_STATUS_EXT
        );
    }

    #[test]
    fn unknown_error_chunk_type_is_an_error_not_a_protocol_violation() {
        let mut p = BytesMut::new();
        p.put_u32(5);
        p.put_u16(2);
        p.put_slice(b"hi");
        p.put_slice(b"extra fields of a future type");
        let c = decode_chunk(REPLY_TYPE_FLAG_ERROR | 99, &p).unwrap();
        assert_eq!(
            c,
            Chunk::Error(ErrorChunk {
                chunk_type: REPLY_TYPE_FLAG_ERROR | 99,
                error: 5,
                message: "hi".into(),
                offset: None
            })
        );
    }

    #[test]
    fn malformed_chunks_are_protocol_errors() {
        let cases: Vec<(u16, Vec<u8>, &str)> = vec![
            (REPLY_TYPE_NONE, vec![0], "NONE chunk"),
            (
                REPLY_TYPE_OFFSET_DATA,
                vec![0; 7],
                "OFFSET_DATA chunk is truncated",
            ),
            (
                REPLY_TYPE_OFFSET_HOLE,
                vec![0; 11],
                "OFFSET_HOLE chunk has 11",
            ),
            (REPLY_TYPE_OFFSET_HOLE, vec![0; 12], "zero length"),
            (REPLY_TYPE_BLOCK_STATUS, vec![0; 4], "malformed length"),
            (REPLY_TYPE_BLOCK_STATUS, vec![0; 13], "malformed length"),
            (
                REPLY_TYPE_BLOCK_STATUS_EXT,
                vec![0, 0, 0, 1, 0, 0, 0, 2, 0, 0],
                "announces 2",
            ),
            (
                REPLY_TYPE_ERROR,
                vec![0, 0, 0, 5, 0, 9, b'x'],
                "message is truncated",
            ),
            (REPLY_TYPE_ERROR, vec![0, 0, 0, 0, 0, 0], "error value 0"),
            (
                REPLY_TYPE_ERROR_OFFSET,
                vec![0, 0, 0, 5, 0, 0, 1],
                "instead of 8",
            ),
            (77, vec![], "unknown reply chunk type 77"),
        ];
        for (t, payload, want) in cases {
            let e = decode_chunk(t, &payload).unwrap_err();
            assert!(e.is_protocol(), "{e}");
            assert!(e.to_string().contains(want), "type {t}: {e} lacks {want:?}");
        }
    }

    #[test]
    fn requests_round_trip_and_compact_rejects_64_bit_lengths() {
        let req = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 9,
            offset: 1 << 33,
            length: 65536,
        };
        for extended in [false, true] {
            let mut buf = BytesMut::new();
            encode_request(&req, extended, &mut buf).unwrap();
            assert_eq!(
                buf.len(),
                if extended {
                    EXTENDED_REQUEST_LEN
                } else {
                    COMPACT_REQUEST_LEN
                }
            );
            assert_eq!(decode_request(&buf).unwrap(), (req, extended));
        }
        let big = Request {
            length: 1 << 32,
            command: CMD_TRIM,
            ..req
        };
        let mut buf = BytesMut::new();
        let e = encode_request(&big, false, &mut buf).unwrap_err();
        assert!(e.to_string().contains("TRIM length 4294967296"), "{e}");
        encode_request(&big, true, &mut buf).unwrap();
        assert_eq!(decode_request(&buf).unwrap().0.length, 1 << 32);
    }

    #[test]
    fn simple_reply_and_bad_magic() {
        let mut buf = BytesMut::new();
        encode_simple_reply(22, 77, &mut buf);
        assert_eq!(
            decode_reply_header(&buf).unwrap(),
            ReplyHeader::Simple {
                error: 22,
                cookie: 77
            }
        );
        let e = reply_header_len(0xdead_beef).unwrap_err();
        assert!(e.is_protocol());
        assert!(e.to_string().contains("bad magic 0xdeadbeef"), "{e}");
        assert!(decode_reply_header(&buf[..10])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }

    #[test]
    fn handshake_messages() {
        let mut g = BytesMut::new();
        g.put_u64(NBDMAGIC);
        g.put_u64(IHAVEOPT);
        g.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(
            decode_greeting(&g).unwrap(),
            Greeting::Newstyle { flags: 3 }
        );
        let mut old = BytesMut::new();
        old.put_u64(NBDMAGIC);
        old.put_u64(CLISERV_MAGIC);
        assert_eq!(decode_greeting(&old).unwrap(), Greeting::Oldstyle);
        assert!(decode_greeting(&[0; 18])
            .unwrap_err()
            .to_string()
            .contains("not an NBD server"));

        let mut r = BytesMut::new();
        encode_option_reply(OPT_GO, REP_ERR_UNKNOWN, b"no", &mut r);
        let h = decode_option_reply_header(&r).unwrap();
        assert_eq!(
            h,
            OptionReplyHeader {
                option: OPT_GO,
                reply_type: REP_ERR_UNKNOWN,
                length: 2
            }
        );
        assert_eq!(reply_type_name(h.reply_type), "NBD_REP_ERR_UNKNOWN");

        for info in [
            Info::Export {
                size: 1_000_001,
                flags: FLAG_HAS_FLAGS | FLAG_SEND_TRIM,
            },
            Info::BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 1 << 25,
            },
            Info::Other(INFO_NAME),
        ] {
            let mut b = BytesMut::new();
            encode_info(&info, &mut b);
            assert_eq!(decode_info(&b).unwrap(), info);
        }
        assert!(decode_info(&[0, 0, 1])
            .unwrap_err()
            .to_string()
            .contains("NBD_INFO_EXPORT"));

        let mut m = BytesMut::new();
        encode_meta_context(3, "base:allocation", &mut m);
        assert_eq!(
            decode_meta_context(&m).unwrap(),
            (3, "base:allocation".to_string())
        );
        assert!(decode_meta_context(&[0, 0, 0, 1, 0xff]).is_err());

        let mut o = BytesMut::new();
        encode_option(OPT_GO, &encode_go_data("disk0", &[INFO_BLOCK_SIZE]), &mut o);
        assert_eq!(&o[..8], &IHAVEOPT.to_be_bytes());
        assert_eq!(&o[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&o[12..16], &(4u32 + 5 + 2 + 2).to_be_bytes());
        let q = encode_meta_context_data("e", &["base:allocation".to_string()]);
        assert_eq!(q.len(), 4 + 1 + 4 + 4 + 15);
    }

    #[test]
    fn server_side_handshake_messages_round_trip_with_the_client_encoders() {
        let mut g = BytesMut::new();
        encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, &mut g);
        assert_eq!(g.len(), GREETING_LEN);
        assert_eq!(
            decode_greeting(&g).unwrap(),
            Greeting::Newstyle { flags: 3 }
        );

        let mut o = BytesMut::new();
        let go = encode_go_data("drive-scsi0", &[INFO_BLOCK_SIZE, INFO_NAME]);
        encode_option(OPT_GO, &go, &mut o);
        assert_eq!(decode_option_header(&o).unwrap(), (OPT_GO, go.len() as u32));
        assert_eq!(
            decode_go_data(&o[OPTION_HEADER_LEN..]).unwrap(),
            ("drive-scsi0".to_string(), vec![INFO_BLOCK_SIZE, INFO_NAME])
        );
        assert!(decode_option_header(&[0; 16])
            .unwrap_err()
            .to_string()
            .contains("IHAVEOPT"));

        let queries = vec!["base:allocation".to_string(), "qemu:".to_string()];
        let m = encode_meta_context_data("", &queries);
        assert_eq!(
            decode_meta_context_data(&m).unwrap(),
            (String::new(), queries)
        );

        let mut r = BytesMut::new();
        encode_export_name_reply(1 << 40, FLAG_HAS_FLAGS | FLAG_READ_ONLY, false, &mut r);
        assert_eq!(r.len(), 8 + 2 + 124);
        assert_eq!(&r[..8], &(1u64 << 40).to_be_bytes());
        let mut r = BytesMut::new();
        encode_export_name_reply(1, 3, true, &mut r);
        assert_eq!(r.len(), 10);

        let mut e = BytesMut::new();
        encode_server_entry("disk0", &mut e);
        assert_eq!(&e[..], b"\0\0\0\x05disk0");
    }

    #[test]
    fn malformed_option_data_is_a_protocol_error() {
        for (bad, want) in [
            (&[0u8, 0, 0][..], "export name is truncated"),
            (&[0, 0, 0, 9, b'a'][..], "export name is truncated"),
            (
                &[0, 0, 0, 0, 0, 2, 0, 1][..],
                "2 information requests in 2 bytes",
            ),
            (&[0, 0, 0, 1, 0xff, 0, 0][..], "not valid UTF-8"),
        ] {
            let e = decode_go_data(bad).unwrap_err();
            assert!(e.is_protocol() && e.to_string().contains(want), "{e}");
        }
        for (bad, want) in [
            (
                &[0u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff][..],
                "queries in 0 bytes",
            ),
            (&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5, b'a'][..], "truncated"),
            (&[0, 0, 0, 0, 0, 0, 0, 0, 7][..], "1 stray bytes"),
        ] {
            let e = decode_meta_context_data(bad).unwrap_err();
            assert!(e.is_protocol() && e.to_string().contains(want), "{e}");
        }
    }
}
