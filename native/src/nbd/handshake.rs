//! Fixed newstyle negotiation over any byte stream.
//!
//! Order of options: EXTENDED_HEADERS (when wanted; it implies structured replies), else
//! STRUCTURED_REPLY; SET_META_CONTEXT (needs structured replies); GO asking for block sizes,
//! falling back to EXPORT_NAME only when the server does not know GO at all. Every option gets
//! its final reply before the next is sent, as the spec requires.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::*;
use super::info::{BlockSizes, ExportInfo, MetaContext};
use crate::error::{Error, Result};

/// Option replies are strings and small structs; a meta context listing of many bitmaps is the
/// largest legitimate one. Anything bigger means a confused or hostile server.
const MAX_OPTION_REPLY: u32 = 1024 * 1024;

fn io_error(what: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::closed(format!("server closed the connection while {what}"))
    } else {
        Error::io(what.to_string(), e)
    }
}

async fn read_exact<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8], what: &str) -> Result<()> {
    s.read_exact(buf)
        .await
        .map(drop)
        .map_err(|e| io_error(what, e))
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) -> Result<()> {
    let mut buf = BytesMut::new();
    encode_option(option, data, &mut buf);
    let what = format!("sending {}", option_name(option));
    s.write_all(&buf).await.map_err(|e| io_error(&what, e))?;
    s.flush().await.map_err(|e| io_error(&what, e))
}

/// Reads one reply to `option`: its type and payload.
async fn read_reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>)> {
    let what = format!("reading the reply to {}", option_name(option));
    let mut hdr = [0u8; OPTION_REPLY_HEADER_LEN];
    read_exact(s, &mut hdr, &what).await?;
    let h = decode_option_reply_header(&hdr)?;
    if h.option != option {
        return Err(Error::protocol(format!(
            "server answered {} while {} was pending",
            option_name(h.option),
            option_name(option)
        )));
    }
    if h.length > MAX_OPTION_REPLY {
        return Err(Error::protocol(format!(
            "oversize {} reply to {}: {} bytes",
            reply_type_name(h.reply_type),
            option_name(option),
            h.length
        )));
    }
    let mut payload = vec![0u8; h.length as usize];
    read_exact(s, &mut payload, &what).await?;
    Ok((h.reply_type, payload))
}

/// Turns an `NBD_REP_ERR_*` (or an out-of-place reply type) into an error saying what failed.
fn option_error(option: u32, reply: u32, payload: &[u8], export: &str) -> Error {
    if reply & REP_FLAG_ERROR == 0 {
        return Error::protocol(format!(
            "unexpected {} reply to {}",
            reply_type_name(reply),
            option_name(option)
        ));
    }
    let msg = String::from_utf8_lossy(payload);
    let detail = if msg.is_empty() {
        String::new()
    } else {
        format!(": {msg}")
    };
    let what = format!(
        "server refused {} with {}{detail}",
        option_name(option),
        reply_type_name(reply)
    );
    match reply {
        REP_ERR_UNKNOWN => Error::invalid_argument(format!(
            "export {export:?} does not exist on the server ({what})"
        )),
        REP_ERR_TLS_REQD => Error::unsupported(format!(
            "server requires TLS, which is not supported ({what})"
        )),
        REP_ERR_SHUTDOWN => Error::closed(format!("server is shutting down ({what})")),
        REP_ERR_INVALID | REP_ERR_TOO_BIG => Error::invalid_argument(what),
        _ => Error::unsupported(what),
    }
}

/// Greeting and client flags. Returns the server's handshake flags.
async fn start<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<u16> {
    // Oldstyle servers send more than 18 bytes too, so reading 18 is safe either way.
    let mut greeting = [0u8; GREETING_LEN];
    read_exact(s, &mut greeting, "reading the server greeting").await?;
    let flags = match decode_greeting(&greeting)? {
        Greeting::Oldstyle => {
            return Err(Error::unsupported(
                "server uses oldstyle negotiation, which is not supported",
            ))
        }
        Greeting::Newstyle { flags } => flags,
    };
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::unsupported(
            "server does not offer fixed newstyle negotiation",
        ));
    }
    let mut client = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        client |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&client.to_be_bytes())
        .await
        .map_err(|e| io_error("sending client flags", e))?;
    Ok(flags)
}

/// Sends an option without data that the server either ACKs or refuses.
async fn try_simple_option<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
) -> Result<bool> {
    send_option(s, option, &[]).await?;
    let (reply, payload) = read_reply(s, option).await?;
    match reply {
        REP_ACK => Ok(true),
        REP_ERR_SHUTDOWN => Err(option_error(option, reply, &payload, "")),
        // Any other refusal just means "not available": the caller falls back.
        r if r & REP_FLAG_ERROR != 0 => Ok(false),
        r => Err(option_error(option, r, &payload, "")),
    }
}

fn check_block_sizes(minimum: u32, preferred: u32, maximum: u32) -> Result<BlockSizes> {
    let ok = minimum.is_power_of_two()
        && minimum <= 64 * 1024
        && preferred.is_power_of_two()
        && preferred >= minimum
        && maximum >= minimum;
    if !ok {
        return Err(Error::protocol(format!(
            "server sent inconsistent block sizes: minimum {minimum}, preferred {preferred}, maximum {maximum}"
        )));
    }
    Ok(BlockSizes {
        minimum,
        preferred,
        maximum,
    })
}

/// Negotiates `export` and enters transmission. `meta_contexts` are requested with
/// SET_META_CONTEXT; the ones the server does not return are absent from the result.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    meta_contexts: &[String],
    extended_headers: bool,
) -> Result<ExportInfo> {
    let server_flags = start(s).await?;

    let mut extended = false;
    if extended_headers {
        extended = try_simple_option(s, OPT_EXTENDED_HEADERS).await?;
    }
    // Extended headers imply structured replies; asking again is redundant.
    let structured = extended || try_simple_option(s, OPT_STRUCTURED_REPLY).await?;

    let mut contexts = Vec::new();
    // Without structured replies there is no way to receive block status, so don't ask.
    if structured && !meta_contexts.is_empty() {
        send_option(
            s,
            OPT_SET_META_CONTEXT,
            &encode_meta_context_data(export, meta_contexts),
        )
        .await?;
        loop {
            let (reply, payload) = read_reply(s, OPT_SET_META_CONTEXT).await?;
            match reply {
                REP_META_CONTEXT => {
                    let (id, name) = decode_meta_context(&payload)?;
                    contexts.push(MetaContext { id, name });
                }
                REP_ACK => break,
                REP_ERR_SHUTDOWN => {
                    return Err(option_error(OPT_SET_META_CONTEXT, reply, &payload, export))
                }
                // A refusal (no such export, contexts unsupported) leaves no contexts; an
                // unknown export is reported by GO right after, with a clearer message.
                r if r & REP_FLAG_ERROR != 0 => {
                    contexts.clear();
                    break;
                }
                r => return Err(option_error(OPT_SET_META_CONTEXT, r, &payload, export)),
            }
        }
    }

    send_option(s, OPT_GO, &encode_go_data(export, &[INFO_BLOCK_SIZE])).await?;
    let mut size_flags = None;
    let mut block_sizes = BlockSizes::default();
    loop {
        let (reply, payload) = read_reply(s, OPT_GO).await?;
        match reply {
            REP_INFO => match decode_info(&payload)? {
                Info::Export { size, flags } => size_flags = Some((size, flags)),
                Info::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                } => block_sizes = check_block_sizes(minimum, preferred, maximum)?,
                Info::Other(_) => {}
            },
            REP_ACK => break,
            // Servers older than NBD_OPT_GO only know EXPORT_NAME.
            REP_ERR_UNSUP if size_flags.is_none() => {
                size_flags = Some(export_name(s, export, server_flags).await?);
                break;
            }
            r => return Err(option_error(OPT_GO, r, &payload, export)),
        }
    }
    let (size, flags) = size_flags.ok_or_else(|| {
        Error::protocol("server ended NBD_OPT_GO without sending NBD_INFO_EXPORT")
    })?;
    s.flush()
        .await
        .map_err(|e| io_error("finishing the handshake", e))?;
    Ok(ExportInfo {
        name: export.to_string(),
        size,
        flags,
        block_sizes,
        meta_contexts: contexts,
        structured_replies: structured,
        extended_headers: extended,
    })
}

/// `NBD_OPT_EXPORT_NAME`: no reply header; the server sends size and flags or hangs up.
async fn export_name<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    server_flags: u16,
) -> Result<(u64, u16)> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes()).await?;
    let what =
        format!("reading the reply to NBD_OPT_EXPORT_NAME {export:?} (does the export exist?)");
    let mut buf = [0u8; 10];
    read_exact(s, &mut buf, &what).await?;
    let size = u64::from_be_bytes([
        buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7],
    ]);
    let flags = u16::from_be_bytes([buf[8], buf[9]]);
    if server_flags & FLAG_NO_ZEROES == 0 {
        let mut zeroes = [0u8; 124];
        read_exact(s, &mut zeroes, &what).await?;
    }
    Ok((size, flags))
}

/// Lists the meta contexts matching `queries` on `export` (e.g. `qemu:dirty-bitmap:` lists the
/// bitmaps), then ends the session with NBD_OPT_ABORT.
pub(crate) async fn list_meta_contexts<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    queries: &[String],
) -> Result<Vec<String>> {
    start(s).await?;
    // Servers (QEMU among them) only answer meta context options after structured replies.
    try_simple_option(s, OPT_STRUCTURED_REPLY).await?;
    send_option(
        s,
        OPT_LIST_META_CONTEXT,
        &encode_meta_context_data(export, queries),
    )
    .await?;
    let mut names = Vec::new();
    loop {
        let (reply, payload) = read_reply(s, OPT_LIST_META_CONTEXT).await?;
        match reply {
            REP_META_CONTEXT => names.push(decode_meta_context(&payload)?.1),
            REP_ACK => break,
            r => return Err(option_error(OPT_LIST_META_CONTEXT, r, &payload, export)),
        }
    }
    // A polite goodbye; the answer does not matter any more.
    if send_option(s, OPT_ABORT, &[]).await.is_ok() {
        let _ = read_reply(s, OPT_ABORT).await;
    }
    Ok(names)
}
