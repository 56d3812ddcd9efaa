//! The server's side of fixed newstyle negotiation, as a pure state machine: one client option
//! in, the bytes to answer and what happens next out. `mod.rs` reads the options off the socket
//! and writes the answers; everything the protocol decides is here and unit-tested without I/O.
//!
//! Offered: `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT` with the one context `base:allocation`. Refused
//! with `NBD_REP_ERR_UNSUP`: `STARTTLS` (a private unix socket needs no TLS), extended headers
//! (compact requests carry up to 4 GiB, which no client asks of a read-only disk) and anything
//! newer. Export names are exact; the empty name is the default export, the first one.

use bytes::BytesMut;

use crate::nbd::codec::*;
use crate::source::CONTEXT_ALLOCATION;

/// Transmission flags of every export: read-only, and safe for several connections at once
/// (nothing changes, so every connection sees the same bytes).
pub const EXPORT_FLAGS: u16 = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN;
/// Id of `base:allocation` on every connection that selects it.
pub const ALLOCATION_CONTEXT_ID: u32 = 1;
/// Largest READ served at once (also the advertised maximum block size): what QEMU allows.
pub const MAX_READ: u32 = 32 << 20;
/// Largest option data accepted; export names and queries are short.
pub const MAX_OPTION_DATA: u32 = 64 << 10;

/// Handshake flags the server sends.
pub const SERVER_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// What the negotiation knows of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    pub size: u64,
}

/// What follows an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read the next option.
    Option,
    /// Enter transmission on this export.
    Transmit(Session),
    /// Close the connection (after writing the answer, if any).
    Close,
}

/// What a connection negotiated, for transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Index of the export.
    pub export: usize,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub allocation: bool,
}

/// One connection's negotiation.
pub struct Negotiation<'a> {
    exports: &'a [ExportEntry],
    no_zeroes: bool,
    structured: bool,
    /// The export `SET_META_CONTEXT` selected `base:allocation` for, if it did.
    allocation_for: Option<String>,
}

/// Client flags this server understands.
const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

impl<'a> Negotiation<'a> {
    /// Starts from the client's flags; `None` when they hold a flag this server does not know
    /// (the spec has the server close then).
    pub fn new(exports: &'a [ExportEntry], client_flags: u32) -> Option<Negotiation<'a>> {
        if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
            return None;
        }
        Some(Negotiation {
            exports,
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            structured: false,
            allocation_for: None,
        })
    }

    /// The export `name` names: exact, or the first for the empty (default) name.
    fn find(&self, name: &str) -> Option<usize> {
        if name.is_empty() && !self.exports.is_empty() {
            return Some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    /// Answers one option into `out`.
    pub fn option(&mut self, option: u32, data: &[u8], out: &mut BytesMut) -> Next {
        let reply = |out: &mut BytesMut, t: u32, payload: &[u8]| {
            encode_option_reply(option, t, payload, out)
        };
        let error = |out: &mut BytesMut, t: u32, message: &str| {
            encode_option_reply(option, t, message.as_bytes(), out)
        };
        match option {
            OPT_EXPORT_NAME => {
                // no way to refuse but to hang up (the spec's own words)
                let Ok(name) = std::str::from_utf8(data) else {
                    return Next::Close;
                };
                let Some(i) = self.find(name) else {
                    return Next::Close;
                };
                encode_export_name_reply(self.exports[i].size, EXPORT_FLAGS, self.no_zeroes, out);
                Next::Transmit(self.session(i))
            }
            OPT_ABORT => {
                reply(out, REP_ACK, &[]);
                Next::Close
            }
            OPT_LIST => {
                if !data.is_empty() {
                    error(out, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Next::Option;
                }
                for e in self.exports {
                    let mut entry = BytesMut::new();
                    encode_server_entry(&e.name, &mut entry);
                    reply(out, REP_SERVER, &entry);
                }
                reply(out, REP_ACK, &[]);
                Next::Option
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error(
                        out,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                    return Next::Option;
                }
                self.structured = true;
                reply(out, REP_ACK, &[]);
                Next::Option
            }
            OPT_INFO | OPT_GO => {
                let (name, infos) = match decode_go_data(data) {
                    Ok(d) => d,
                    Err(e) => {
                        error(out, REP_ERR_INVALID, &e.to_string());
                        return Next::Option;
                    }
                };
                let Some(i) = self.find(&name) else {
                    error(out, REP_ERR_UNKNOWN, &format!("no export named {name:?}"));
                    return Next::Option;
                };
                let mut info = BytesMut::new();
                encode_info(
                    &Info::Export {
                        size: self.exports[i].size,
                        flags: EXPORT_FLAGS,
                    },
                    &mut info,
                );
                reply(out, REP_INFO, &info);
                if infos.contains(&INFO_BLOCK_SIZE) {
                    let mut info = BytesMut::new();
                    encode_info(
                        &Info::BlockSize {
                            minimum: 1,
                            preferred: 4096,
                            maximum: MAX_READ,
                        },
                        &mut info,
                    );
                    reply(out, REP_INFO, &info);
                }
                reply(out, REP_ACK, &[]);
                if option == OPT_GO {
                    Next::Transmit(self.session(i))
                } else {
                    Next::Option
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data, out),
            _ => {
                error(
                    out,
                    REP_ERR_UNSUP,
                    &format!("{} is not supported", option_name(option)),
                );
                Next::Option
            }
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut BytesMut) -> Next {
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            encode_option_reply(
                option,
                REP_ERR_INVALID,
                b"meta contexts need structured replies first",
                out,
            );
            return Next::Option;
        }
        let (name, queries) = match decode_meta_context_data(data) {
            Ok(d) => d,
            Err(e) => {
                encode_option_reply(option, REP_ERR_INVALID, e.to_string().as_bytes(), out);
                return Next::Option;
            }
        };
        let Some(i) = self.find(&name) else {
            let message = format!("no export named {name:?}");
            encode_option_reply(option, REP_ERR_UNKNOWN, message.as_bytes(), out);
            return Next::Option;
        };
        // LIST with no query, or the namespace alone, lists what there is; SET selects exact names
        let matches = |q: &str| q == CONTEXT_ALLOCATION || (!set && q == "base:");
        let selected = if queries.is_empty() {
            !set
        } else {
            queries.iter().any(|q| matches(q))
        };
        if selected {
            let mut m = BytesMut::new();
            encode_meta_context(ALLOCATION_CONTEXT_ID, CONTEXT_ALLOCATION, &mut m);
            encode_option_reply(option, REP_META_CONTEXT, &m, out);
        }
        if set {
            // a SET replaces what an earlier one selected
            self.allocation_for = selected.then(|| self.exports[i].name.clone());
        }
        encode_option_reply(option, REP_ACK, &[], out);
        Next::Option
    }

    fn session(&self, export: usize) -> Session {
        Session {
            export,
            structured: self.structured,
            // contexts selected for another export do not carry over
            allocation: self.structured
                && self.allocation_for.as_deref() == Some(self.exports[export].name.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports() -> Vec<ExportEntry> {
        vec![
            ExportEntry {
                name: "drive-scsi0".into(),
                size: 1 << 30,
            },
            ExportEntry {
                name: "drive-scsi1".into(),
                size: 4096,
            },
        ]
    }

    /// Splits `out` into option replies: (option, type, payload).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            let h = decode_option_reply_header(out).unwrap();
            let end = OPTION_REPLY_HEADER_LEN + h.length as usize;
            v.push((
                h.option,
                h.reply_type,
                out[OPTION_REPLY_HEADER_LEN..end].to_vec(),
            ));
            out = &out[end..];
        }
        v
    }

    fn answer(n: &mut Negotiation, option: u32, data: &[u8]) -> (Next, Vec<(u32, u32, Vec<u8>)>) {
        let mut out = BytesMut::new();
        let next = n.option(option, data, &mut out);
        (next, replies(&out))
    }

    #[test]
    fn unknown_client_flags_close() {
        let e = exports();
        assert!(Negotiation::new(&e, 1 << 5).is_none());
        assert!(Negotiation::new(&e, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).is_some());
    }

    #[test]
    fn go_with_block_size_then_transmission_with_allocation() {
        let e = exports();
        let mut n = Negotiation::new(&e, FLAG_C_FIXED_NEWSTYLE).unwrap();
        let (next, r) = answer(&mut n, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!((next, r[0].1), (Next::Option, REP_ACK));
        let q = encode_meta_context_data("drive-scsi1", &["base:allocation".into()]);
        let (_, r) = answer(&mut n, OPT_SET_META_CONTEXT, &q);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(
            decode_meta_context(&r[0].2).unwrap(),
            (ALLOCATION_CONTEXT_ID, "base:allocation".into())
        );
        assert_eq!(r[1].1, REP_ACK);
        let (next, r) = answer(
            &mut n,
            OPT_GO,
            &encode_go_data("drive-scsi1", &[INFO_BLOCK_SIZE]),
        );
        assert_eq!(
            next,
            Next::Transmit(Session {
                export: 1,
                structured: true,
                allocation: true
            })
        );
        assert_eq!(
            decode_info(&r[0].2).unwrap(),
            Info::Export {
                size: 4096,
                flags: EXPORT_FLAGS
            }
        );
        assert_eq!(
            decode_info(&r[1].2).unwrap(),
            Info::BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: MAX_READ
            }
        );
        assert_eq!(r[2].1, REP_ACK);
        assert!(r.iter().all(|x| x.0 == OPT_GO));
    }

    #[test]
    fn contexts_need_structured_replies_and_do_not_carry_to_another_export() {
        let e = exports();
        let mut n = Negotiation::new(&e, 1).unwrap();
        let q = encode_meta_context_data("drive-scsi0", &["base:allocation".into()]);
        let (_, r) = answer(&mut n, OPT_SET_META_CONTEXT, &q);
        assert_eq!(r[0].1, REP_ERR_INVALID);
        answer(&mut n, OPT_STRUCTURED_REPLY, &[]);
        answer(&mut n, OPT_SET_META_CONTEXT, &q);
        let (next, _) = answer(&mut n, OPT_GO, &encode_go_data("drive-scsi1", &[]));
        assert_eq!(
            next,
            Next::Transmit(Session {
                export: 1,
                structured: true,
                allocation: false
            })
        );
        // a SET of nothing known clears the selection
        let mut n = Negotiation::new(&e, 1).unwrap();
        answer(&mut n, OPT_STRUCTURED_REPLY, &[]);
        answer(&mut n, OPT_SET_META_CONTEXT, &q);
        let other = encode_meta_context_data("drive-scsi0", &["qemu:dirty-bitmap:x".into()]);
        let (_, r) = answer(&mut n, OPT_SET_META_CONTEXT, &other);
        assert_eq!(r.iter().map(|x| x.1).collect::<Vec<_>>(), vec![REP_ACK]);
        let (next, _) = answer(&mut n, OPT_GO, &encode_go_data("", &[]));
        assert!(matches!(
            next,
            Next::Transmit(Session {
                export: 0,
                allocation: false,
                ..
            })
        ));
    }

    #[test]
    fn list_info_and_unknown_exports() {
        let e = exports();
        let mut n = Negotiation::new(&e, 1).unwrap();
        let (next, r) = answer(&mut n, OPT_LIST, &[]);
        assert_eq!(next, Next::Option);
        let names: Vec<_> = r
            .iter()
            .filter(|x| x.1 == REP_SERVER)
            .map(|x| String::from_utf8_lossy(&x.2[4..]).into_owned())
            .collect();
        assert_eq!(names, vec!["drive-scsi0", "drive-scsi1"]);
        assert_eq!(r.last().unwrap().1, REP_ACK);
        let (next, r) = answer(&mut n, OPT_INFO, &encode_go_data("drive-scsi0", &[]));
        assert_eq!(next, Next::Option);
        assert_eq!(r.len(), 2);
        let (next, r) = answer(&mut n, OPT_GO, &encode_go_data("nope", &[]));
        assert_eq!(next, Next::Option);
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&r[0].2).contains("\"nope\""));
        let (_, r) = answer(
            &mut n,
            OPT_LIST_META_CONTEXT,
            &encode_meta_context_data("x", &[]),
        );
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        // LIST without queries (or the namespace alone) lists base:allocation, structured or not
        for q in [vec![], vec!["base:".to_string()]] {
            let (_, r) = answer(
                &mut n,
                OPT_LIST_META_CONTEXT,
                &encode_meta_context_data("drive-scsi0", &q),
            );
            assert_eq!(r[0].1, REP_META_CONTEXT, "{q:?}");
        }
        for (opt, want) in [
            (OPT_STARTTLS, REP_ERR_UNSUP),
            (OPT_EXTENDED_HEADERS, REP_ERR_UNSUP),
            (99, REP_ERR_UNSUP),
        ] {
            let (next, r) = answer(&mut n, opt, &[]);
            assert_eq!((next, r[0].1), (Next::Option, want));
        }
        let (_, r) = answer(&mut n, OPT_GO, &[0, 0]);
        assert_eq!(r[0].1, REP_ERR_INVALID);
        let (next, r) = answer(&mut n, OPT_ABORT, &[]);
        assert_eq!((next, r[0].1), (Next::Close, REP_ACK));
    }

    #[test]
    fn export_name_answers_size_and_flags_or_hangs_up() {
        let e = exports();
        let mut n = Negotiation::new(&e, FLAG_C_FIXED_NEWSTYLE).unwrap();
        let mut out = BytesMut::new();
        assert_eq!(
            n.option(OPT_EXPORT_NAME, b"drive-scsi1", &mut out),
            Next::Transmit(Session {
                export: 1,
                structured: false,
                allocation: false
            })
        );
        assert_eq!(out.len(), 134);
        assert_eq!(&out[..8], &4096u64.to_be_bytes());
        assert_eq!(&out[8..10], &EXPORT_FLAGS.to_be_bytes());
        let mut n = Negotiation::new(&e, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).unwrap();
        let mut out = BytesMut::new();
        assert!(matches!(
            n.option(OPT_EXPORT_NAME, b"", &mut out),
            Next::Transmit(_)
        ));
        assert_eq!(out.len(), 10);
        let mut out = BytesMut::new();
        assert_eq!(n.option(OPT_EXPORT_NAME, b"nope", &mut out), Next::Close);
        assert!(out.is_empty());
    }
}
