//! NBD URIs (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`), after the NBD
//! URI specification. TLS schemes are refused: this client does not speak TLS, and silently
//! connecting in clear text to something the user asked to be encrypted would be worse.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// `host` is a name or an IP address; IPv6 without brackets.
    Tcp {
        host: String,
        port: u16,
    },
    Unix {
        path: PathBuf,
    },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: NbdAddress,
    /// The export name, percent-decoded (may be empty: the server's default export).
    pub export: String,
}

fn bad(uri: &str, what: impl fmt::Display) -> Error {
    Error::invalid_argument(format!("invalid NBD URI {uri:?}: {what}"))
}

fn percent_decode(s: &str, uri: &str, what: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let v = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            match v {
                Some(v) => out.push(v),
                None => return Err(bad(uri, format_args!("bad percent escape in the {what}"))),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(uri, format_args!("the {what} is not valid UTF-8")))
}

/// Percent-encodes all but unreserved characters and those in `keep`.
fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) || keep.contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl NbdUri {
    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> Self {
        NbdUri {
            address: NbdAddress::Unix { path: path.into() },
            export: export.into(),
        }
    }

    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> Self {
        NbdUri {
            address: NbdAddress::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    pub fn parse(uri: &str) -> Result<NbdUri> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| bad(uri, "missing \"scheme://\""))?;
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+tcp" | "nbds+unix" | "nbds+vsock" => {
                return Err(bad(
                    uri,
                    format_args!("scheme {scheme:?} needs TLS, which is not supported"),
                ))
            }
            "nbd+vsock" => return Err(bad(uri, "vsock transport is not supported")),
            _ => {
                return Err(bad(
                    uri,
                    format_args!("unknown scheme {scheme:?}, expected nbd or nbd+unix"),
                ))
            }
        };
        if rest.contains('#') {
            return Err(bad(uri, "fragments (#) are not allowed"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path, uri, "export name")?;

        let mut socket = None;
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "socket" if unix => socket = Some(percent_decode(value, uri, "socket path")?),
                "socket" => return Err(bad(uri, "socket= is only valid with nbd+unix")),
                k if k.starts_with("tls") => {
                    return Err(bad(
                        uri,
                        format_args!("query parameter {k:?} needs TLS, which is not supported"),
                    ))
                }
                k => return Err(bad(uri, format_args!("unknown query parameter {k:?}"))),
            }
        }

        if unix {
            if !authority.is_empty() {
                return Err(bad(
                    uri,
                    "nbd+unix takes no host: write nbd+unix:///EXPORT?socket=PATH",
                ));
            }
            let path = socket.ok_or_else(|| bad(uri, "nbd+unix needs ?socket=PATH"))?;
            if path.is_empty() {
                return Err(bad(uri, "empty socket path"));
            }
            return Ok(NbdUri::unix(path, export));
        }

        if authority.contains('@') {
            return Err(bad(uri, "user information (user@) is not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad(uri, "unterminated [IPv6] host"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| bad(uri, "garbage after [IPv6] host"))?,
                    ),
                ),
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad(uri, "missing host"));
        }
        let host = percent_decode(host, uri, "host")?;
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 && p.bytes().all(|c| c.is_ascii_digit()) => n,
                _ => return Err(bad(uri, format_args!("bad port {p:?}"))),
            },
        };
        Ok(NbdUri::tcp(host, port, export))
    }
}

impl std::str::FromStr for NbdUri {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        NbdUri::parse(s)
    }
}

impl fmt::Display for NbdUri {
    /// Canonical form: lowercase scheme, default port omitted, minimal percent-encoding.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export, b"/:@");
        match &self.address {
            NbdAddress::Tcp { host, port } => {
                if host.contains(':') {
                    write!(f, "nbd://[{host}]")?;
                } else {
                    write!(f, "nbd://{}", percent_encode(host, b""))?;
                }
                if *port != DEFAULT_PORT {
                    write!(f, ":{port}")?;
                }
                write!(f, "/{export}")
            }
            NbdAddress::Unix { path } => {
                let path = percent_encode(&path.to_string_lossy(), b"/");
                write!(f, "nbd+unix:///{export}?socket={path}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_forms() {
        assert_eq!(
            NbdUri::parse("nbd://example.com/disk0").unwrap(),
            NbdUri::tcp("example.com", 10809, "disk0")
        );
        assert_eq!(
            NbdUri::parse("nbd://h:1234").unwrap(),
            NbdUri::tcp("h", 1234, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]:5000/a%20b").unwrap(),
            NbdUri::tcp("::1", 5000, "a b")
        );
        assert_eq!(
            NbdUri::parse("nbd://[fe80::1]/x").unwrap(),
            NbdUri::tcp("fe80::1", 10809, "x")
        );
        assert_eq!(
            NbdUri::parse("NBD://h/dir/name").unwrap(),
            NbdUri::tcp("h", 10809, "dir/name")
        );
    }

    #[test]
    fn parses_unix_forms() {
        assert_eq!(
            NbdUri::parse("nbd+unix:///drive-scsi0?socket=/run/qemu/nbd%20x.sock").unwrap(),
            NbdUri::unix("/run/qemu/nbd x.sock", "drive-scsi0")
        );
        assert_eq!(
            NbdUri::parse("nbd+unix://?socket=/s").unwrap(),
            NbdUri::unix("/s", "")
        );
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        let cases = [
            ("nbd://h:10809/e", "nbd://h/e"),
            ("nbd://[::1]:99/x%2fy", "nbd://[::1]:99/x/y"),
            (
                "nbd+unix:///a%20b?socket=/tmp/s%3f",
                "nbd+unix:///a%20b?socket=/tmp/s%3F",
            ),
            ("nbd://h", "nbd://h/"),
        ];
        for (input, canonical) in cases {
            let u = NbdUri::parse(input).unwrap();
            assert_eq!(u.to_string(), canonical);
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
        let odd = NbdUri::unix("/tmp/we?ird&=#", "ex?port#");
        assert_eq!(NbdUri::parse(&odd.to_string()).unwrap(), odd);
    }

    #[test]
    fn rejects_with_a_reason() {
        let cases = [
            ("nbds://h/e", "TLS"),
            ("nbds+unix:///e?socket=/s", "TLS"),
            ("nbd+vsock://1/e", "vsock"),
            ("http://h/e", "unknown scheme"),
            ("h/e", "scheme://"),
            ("nbd:///e", "missing host"),
            ("nbd://h:0/e", "bad port"),
            ("nbd://h:99999/e", "bad port"),
            ("nbd://h:+5/e", "bad port"),
            ("nbd://[::1/e", "unterminated"),
            ("nbd://[::1]x/e", "garbage"),
            ("nbd://u@h/e", "user information"),
            ("nbd://h/e%zz", "percent escape"),
            ("nbd://h/e%ff", "UTF-8"),
            ("nbd://h/e?socket=/s", "only valid with nbd+unix"),
            ("nbd://h/e?tls-certificates=/x", "TLS"),
            ("nbd://h/e?foo=1", "unknown query parameter"),
            ("nbd+unix:///e", "needs ?socket"),
            ("nbd+unix://h/e?socket=/s", "takes no host"),
            ("nbd://h/e#frag", "fragments"),
        ];
        for (input, want) in cases {
            let e = NbdUri::parse(input).unwrap_err();
            assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
            assert!(e.to_string().contains(want), "{input}: {e} lacks {want:?}");
        }
    }
}
