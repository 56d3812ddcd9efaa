//! A scripted fake server over a UnixStream pair: a real handshake, then whatever replies a
//! test wants, including broken ones. Every test runs under a timeout, so a hang fails loudly.

use std::future::Future;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;

use super::codec::*;
use super::*;
use crate::error::{Error, NBD_EIO};

const TIMEOUT: Duration = Duration::from_secs(10);
const ALL_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;

#[derive(Clone)]
struct Fake {
    size: u64,
    flags: u16,
    structured: bool,
    extended: bool,
    contexts: Vec<(u32, &'static str)>,
    block_sizes: Option<(u32, u32, u32)>,
    /// Answer GO with this error instead of the export.
    go_error: Option<u32>,
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            size: 1 << 20,
            flags: ALL_FLAGS,
            structured: true,
            extended: false,
            contexts: vec![(1, "base:allocation")],
            block_sizes: None,
            go_error: None,
        }
    }
}

/// Server end after the handshake.
struct Srv {
    s: UnixStream,
    ext: bool,
}

impl Srv {
    async fn read_u32(&mut self) -> u32 {
        self.s.read_u32().await.unwrap()
    }

    async fn option_reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        encode_option_reply(option, reply, data, &mut b);
        self.s.write_all(&b).await.unwrap();
    }

    async fn handshake(s: UnixStream, f: &Fake) -> Option<Srv> {
        let mut srv = Srv { s, ext: false };
        let mut g = BytesMut::new();
        g.put_u64(NBDMAGIC);
        g.put_u64(IHAVEOPT);
        g.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        srv.s.write_all(&g).await.unwrap();
        let _client_flags = srv.read_u32().await;
        loop {
            assert_eq!(srv.s.read_u64().await.unwrap(), IHAVEOPT);
            let opt = srv.read_u32().await;
            let len = srv.read_u32().await as usize;
            let mut data = vec![0u8; len];
            srv.s.read_exact(&mut data).await.unwrap();
            match opt {
                OPT_EXTENDED_HEADERS if f.extended => {
                    srv.ext = true;
                    srv.option_reply(opt, REP_ACK, &[]).await
                }
                OPT_STRUCTURED_REPLY if f.structured => srv.option_reply(opt, REP_ACK, &[]).await,
                OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    for (id, name) in &f.contexts {
                        if text.contains(name) {
                            let mut m = BytesMut::new();
                            encode_meta_context(*id, name, &mut m);
                            srv.option_reply(opt, REP_META_CONTEXT, &m).await;
                        }
                    }
                    srv.option_reply(opt, REP_ACK, &[]).await
                }
                OPT_GO => {
                    if let Some(e) = f.go_error {
                        srv.option_reply(opt, e, b"no such export here").await;
                        return None;
                    }
                    let mut i = BytesMut::new();
                    encode_info(
                        &Info::Export {
                            size: f.size,
                            flags: f.flags,
                        },
                        &mut i,
                    );
                    srv.option_reply(opt, REP_INFO, &i).await;
                    if let Some((minimum, preferred, maximum)) = f.block_sizes {
                        let mut i = BytesMut::new();
                        encode_info(
                            &Info::BlockSize {
                                minimum,
                                preferred,
                                maximum,
                            },
                            &mut i,
                        );
                        srv.option_reply(opt, REP_INFO, &i).await;
                    }
                    srv.option_reply(opt, REP_ACK, &[]).await;
                    return Some(srv);
                }
                _ => srv.option_reply(opt, REP_ERR_UNSUP, &[]).await,
            }
        }
    }

    /// Next request and its WRITE payload.
    async fn req(&mut self) -> (Request, Bytes) {
        let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
        self.s.read_exact(&mut hdr[..4]).await.unwrap();
        let len = request_header_len(u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]])).unwrap();
        self.s.read_exact(&mut hdr[4..len]).await.unwrap();
        let (r, ext) = decode_request(&hdr[..len]).unwrap();
        assert_eq!(ext, self.ext, "request header style");
        let mut payload = vec![
            0u8;
            if r.command == CMD_WRITE {
                r.length as usize
            } else {
                0
            }
        ];
        self.s.read_exact(&mut payload).await.unwrap();
        (r, payload.into())
    }

    async fn raw(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    async fn chunk(&mut self, r: &Request, done: bool, chunk: Chunk) {
        let mut b = BytesMut::new();
        encode_chunk(
            r.cookie,
            if done { REPLY_FLAG_DONE } else { 0 },
            &chunk,
            self.ext,
            r.offset,
            &mut b,
        );
        self.raw(&b).await;
    }

    async fn simple(&mut self, r: &Request, error: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        encode_simple_reply(error, r.cookie, &mut b);
        b.put_slice(data);
        self.raw(&b).await;
    }

    /// Success without data: NONE+DONE when structured, else a simple reply.
    async fn ok(&mut self, r: &Request, structured: bool) {
        if structured {
            self.chunk(r, true, Chunk::None).await
        } else {
            self.simple(r, 0, &[]).await
        }
    }
}

fn opts(meta: &[&str]) -> ConnectOptions {
    let mut o = ConnectOptions::new(NbdUri::unix("/fake.sock", "disk0"));
    o.meta_contexts = meta.iter().map(|s| s.to_string()).collect();
    o
}

/// Starts a fake server running `script` after the handshake; returns the connected client.
async fn start<F, Fut>(
    fake: Fake,
    o: ConnectOptions,
    script: F,
) -> (Result<NbdClient, Error>, tokio::task::JoinHandle<()>)
where
    F: FnOnce(Srv) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (c, s) = UnixStream::pair().unwrap();
    let server = tokio::spawn(async move {
        if let Some(srv) = Srv::handshake(s, &fake).await {
            script(srv).await;
        }
    });
    (NbdClient::connect_stream(c, &o).await, server)
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) % 251) as u8)
        .collect()
}

fn assert_err(e: &Error, code: &str, needle: &str) {
    assert_eq!(e.code(), code, "{e}");
    assert!(
        e.to_string().contains(needle),
        "error {e:?} lacks {needle:?}"
    );
}

#[tokio::test]
async fn out_of_order_replies_with_reversed_data_chunks_and_holes() {
    timeout(TIMEOUT, async {
        let (client, server) = start(Fake::default(), opts(&[]), |mut srv| async move {
            let mut reqs = Vec::new();
            for _ in 0..3 {
                reqs.push(srv.req().await.0);
            }
            // Interleave: the first chunk of every request, newest request first, then the rest.
            for r in reqs.iter().rev() {
                let third = r.length / 3;
                let data = pattern(r.offset + 2 * third, (r.length - 2 * third) as usize);
                srv.chunk(
                    r,
                    false,
                    Chunk::OffsetData {
                        offset: r.offset + 2 * third,
                        data: data.into(),
                    },
                )
                .await;
            }
            for r in reqs.iter().rev() {
                let third = r.length / 3;
                srv.chunk(
                    r,
                    false,
                    Chunk::OffsetHole {
                        offset: r.offset + third,
                        length: third as u32,
                    },
                )
                .await;
                let data = pattern(r.offset, third as usize);
                srv.chunk(
                    r,
                    true,
                    Chunk::OffsetData {
                        offset: r.offset,
                        data: data.into(),
                    },
                )
                .await;
            }
        })
        .await;
        let client = client.unwrap();
        // The third lands in the middle of a larger buffer, as the engine's unit reads do.
        let into = async {
            let buf = client
                .read_into(65536, 30, crate::buffer::ReadBuffer::new(2000)?, 1000)
                .await?;
            let filled = buf.freeze();
            assert!(
                filled.slice(0, 30).is_none(),
                "only the read's range is handed out"
            );
            Ok::<_, Error>(filled.slice(1000, 30).unwrap())
        };
        let (a, b, c) = tokio::join!(client.read(0, 3072), client.read(8192, 3000), into);
        for (got, offset, len) in [(a, 0u64, 3072u64), (b, 8192, 3000), (c, 65536, 30)] {
            let got = got.unwrap();
            let third = len / 3;
            let mut want = pattern(offset, len as usize);
            want[third as usize..2 * third as usize].fill(0);
            assert_eq!(&got[..], &want[..], "read at {offset}");
        }
        server.await.unwrap();
    })
    .await
    .unwrap();
}

/// Runs a read against a server that answers it with `bad`; checks the read and every later
/// request fail with an error naming the problem.
/// `chunk` as the final (DONE) structured reply chunk to `r`, compact headers.
fn last_chunk(r: &Request, chunk: Chunk) -> BytesMut {
    let mut b = BytesMut::new();
    encode_chunk(r.cookie, REPLY_FLAG_DONE, &chunk, false, 0, &mut b);
    b
}

async fn broken_reply(
    bad: impl FnOnce(Request) -> BytesMut + Send + 'static,
    needle: &'static str,
) {
    timeout(TIMEOUT, async {
        let (client, _server) = start(
            Fake::default(),
            opts(&["base:allocation"]),
            |mut srv| async move {
                let (r, _) = srv.req().await;
                srv.raw(&bad(r)).await;
                // Keep the socket open: the client must give up on its own.
                tokio::time::sleep(Duration::from_secs(30)).await;
            },
        )
        .await;
        let client = client.unwrap();
        let e = client.read(4096, 4096).await.unwrap_err();
        assert_err(&e, "ERR_NBD_PROTOCOL", needle);
        let later = client.read(0, 512).await.unwrap_err();
        assert_err(&later, "ERR_NBD_CLOSED", needle);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn wrong_magic_fails_the_request() {
    broken_reply(
        |r| {
            let mut b = BytesMut::new();
            b.put_u32(0x1234_5678);
            b.put_u32(0);
            b.put_u64(r.cookie);
            b
        },
        "bad magic 0x12345678",
    )
    .await;
}

#[tokio::test]
async fn oversize_chunk_length_fails_the_request() {
    broken_reply(
        |r| {
            let mut b = BytesMut::new();
            encode_chunk_header(
                r.cookie,
                0,
                REPLY_TYPE_OFFSET_DATA,
                8 + 4096 + 1,
                false,
                0,
                &mut b,
            );
            b
        },
        "oversize OFFSET_DATA chunk of 4105 bytes",
    )
    .await;
    broken_reply(
        |r| {
            let mut b = BytesMut::new();
            encode_chunk_header(
                r.cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                0xffff_fff0,
                false,
                0,
                &mut b,
            );
            b
        },
        "oversize BLOCK_STATUS chunk",
    )
    .await;
}

#[tokio::test]
async fn unknown_cookie_fails_the_request() {
    broken_reply(
        |r| {
            let mut b = BytesMut::new();
            encode_simple_reply(0, r.cookie + 1000, &mut b);
            b
        },
        "unknown cookie",
    )
    .await;
}

#[tokio::test]
async fn data_chunk_outside_the_request_fails_it() {
    broken_reply(
        |r| {
            last_chunk(
                &r,
                Chunk::OffsetData {
                    offset: r.offset + 4000,
                    data: vec![1u8; 200].into(),
                },
            )
        },
        "OFFSET_DATA [8096, 8296) outside the READ request [4096, 8192)",
    )
    .await;
}

#[tokio::test]
async fn reply_type_inconsistent_with_command_fails_it() {
    broken_reply(
        |r| {
            last_chunk(
                &r,
                Chunk::BlockStatus {
                    context_id: 1,
                    extents: vec![BlockDescriptor {
                        length: 4096,
                        flags: 0,
                    }],
                },
            )
        },
        "BLOCK_STATUS chunk in reply to READ",
    )
    .await;
}

#[tokio::test]
async fn read_reply_with_a_gap_fails_it() {
    broken_reply(
        |r| {
            last_chunk(
                &r,
                Chunk::OffsetData {
                    offset: r.offset,
                    data: vec![1u8; 1024].into(),
                },
            )
        },
        "left [5120, 8192)",
    )
    .await;
}

#[tokio::test]
async fn server_closing_mid_request_fails_every_pending_request() {
    timeout(TIMEOUT, async {
        let (client, server) = start(Fake::default(), opts(&[]), |mut srv| async move {
            let mut reqs = Vec::new();
            for _ in 0..4 {
                reqs.push(srv.req().await.0);
            }
            // Half a data chunk for one request, then hang up.
            let mut b = BytesMut::new();
            encode_chunk_header(
                reqs[1].cookie,
                0,
                REPLY_TYPE_OFFSET_DATA,
                8 + 512,
                false,
                0,
                &mut b,
            );
            b.put_u64(reqs[1].offset);
            b.put_slice(&[7u8; 100]);
            srv.raw(&b).await;
        })
        .await;
        let client = client.unwrap();
        let results = futures::future::join_all((0..4u64).map(|i| client.read(i * 512, 512))).await;
        for r in results {
            let e = r.unwrap_err();
            assert!(e.is_closed(), "{e:?}");
            assert!(
                e.to_string().contains("server closed the connection"),
                "{e}"
            );
        }
        server.await.unwrap();
        assert!(client.flush().await.unwrap_err().is_closed());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn block_status_shorter_longer_and_for_several_contexts() {
    timeout(TIMEOUT, async {
        let fake = Fake {
            contexts: vec![(1, "base:allocation"), (7, "qemu:dirty-bitmap:b0")],
            ..Fake::default()
        };
        let (client, server) = start(
            fake,
            opts(&["base:allocation", "qemu:dirty-bitmap:b0"]),
            |mut srv| async move {
                let d = |length, flags| BlockDescriptor { length, flags };
                // Longer than asked, and another context's answer first.
                let (r, _) = srv.req().await;
                assert_eq!(
                    (r.command, r.offset, r.length),
                    (CMD_BLOCK_STATUS, 4096, 8192)
                );
                srv.chunk(
                    &r,
                    false,
                    Chunk::BlockStatus {
                        context_id: 7,
                        extents: vec![d(8192, 1)],
                    },
                )
                .await;
                srv.chunk(
                    &r,
                    true,
                    Chunk::BlockStatus {
                        context_id: 1,
                        extents: vec![d(4096, 0), d(1 << 19, 3)],
                    },
                )
                .await;
                // block_status_all over [0, 16384): answered in three short pieces.
                for (off, ext) in [
                    (0u64, vec![d(4096, 3)]),
                    (4096, vec![d(4096, 3), d(2048, 0)]),
                    (10240, vec![d(65536, 0)]),
                ] {
                    let (r, _) = srv.req().await;
                    assert_eq!(r.offset, off);
                    srv.chunk(
                        &r,
                        false,
                        Chunk::BlockStatus {
                            context_id: 1,
                            extents: ext,
                        },
                    )
                    .await;
                    srv.chunk(
                        &r,
                        true,
                        Chunk::BlockStatus {
                            context_id: 7,
                            extents: vec![d(1, 0)],
                        },
                    )
                    .await;
                }
            },
        )
        .await;
        let client = client.unwrap();
        assert_eq!(client.info().context_id("qemu:dirty-bitmap:b0"), Some(7));
        let e = client
            .block_status(4096, 8192, "base:allocation")
            .await
            .unwrap();
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 4096,
                    length: 4096,
                    flags: 0
                },
                Extent {
                    offset: 8192,
                    length: 4096,
                    flags: 3
                }
            ]
        );
        let all = client
            .block_status_all(0, 16384, "base:allocation")
            .await
            .unwrap();
        assert_eq!(
            all,
            vec![
                Extent {
                    offset: 0,
                    length: 8192,
                    flags: 3
                },
                Extent {
                    offset: 8192,
                    length: 8192,
                    flags: 0
                }
            ]
        );
        server.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn error_offset_and_error_chunks_become_server_errors() {
    timeout(TIMEOUT, async {
        let (client, server) = start(Fake::default(), opts(&[]), |mut srv| async move {
            let (r, _) = srv.req().await;
            srv.chunk(
                &r,
                false,
                Chunk::OffsetData {
                    offset: r.offset,
                    data: vec![1u8; 512].into(),
                },
            )
            .await;
            let e = ErrorChunk {
                chunk_type: REPLY_TYPE_ERROR_OFFSET,
                error: NBD_EIO,
                message: "boom".into(),
                offset: Some(r.offset + 512),
            };
            srv.chunk(&r, true, Chunk::Error(e)).await;
            let (r, _) = srv.req().await;
            let e = ErrorChunk {
                chunk_type: REPLY_TYPE_FLAG_ERROR | 42,
                error: 28,
                message: String::new(),
                offset: None,
            };
            srv.chunk(&r, true, Chunk::Error(e)).await;
            // Still usable afterwards.
            let (r, _) = srv.req().await;
            srv.chunk(
                &r,
                true,
                Chunk::OffsetData {
                    offset: r.offset,
                    data: vec![9u8; 512].into(),
                },
            )
            .await;
        })
        .await;
        let client = client.unwrap();
        let e = client.read(4096, 4096).await.unwrap_err();
        assert_err(
            &e,
            "ERR_NBD_SERVER",
            "server error EIO on READ at offset 4608 length 4096: boom",
        );
        let se = e.server_error().unwrap();
        assert_eq!(
            (se.errno, se.command, se.offset, se.length),
            (NBD_EIO, "READ", 4608, 4096)
        );
        let e = client
            .write(0, Bytes::from(vec![0u8; 512]), false)
            .await
            .unwrap_err();
        assert_err(
            &e,
            "ERR_NBD_SERVER",
            "server error ENOSPC on WRITE at offset 0 length 512",
        );
        assert_eq!(&client.read(0, 512).await.unwrap()[..], &[9u8; 512][..]);
        server.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn extended_headers_carry_64_bit_lengths() {
    timeout(TIMEOUT, async {
        let fake = Fake {
            extended: true,
            size: 8 << 30,
            ..Fake::default()
        };
        let (client, server) = start(fake, opts(&["base:allocation"]), |mut srv| async move {
            let (r, _) = srv.req().await;
            assert_eq!((r.command, r.length), (CMD_TRIM, 6 << 30));
            srv.ok(&r, true).await;
            let (r, payload) = srv.req().await;
            assert_eq!(
                (r.command, r.flags, &payload[..]),
                (CMD_WRITE, CMD_FLAG_FUA, &b"hello"[..])
            );
            srv.ok(&r, true).await;
            let (r, _) = srv.req().await;
            assert_eq!((r.command, r.length), (CMD_BLOCK_STATUS, 8 << 30));
            let ext = vec![
                BlockDescriptor {
                    length: 5 << 30,
                    flags: 0,
                },
                BlockDescriptor {
                    length: 3 << 30,
                    flags: 1 << 40,
                },
            ];
            srv.chunk(
                &r,
                true,
                Chunk::BlockStatus {
                    context_id: 1,
                    extents: ext,
                },
            )
            .await;
            // A simple reply is not allowed any more.
            let (r, _) = srv.req().await;
            srv.simple(&r, 0, &[]).await;
        })
        .await;
        let client = client.unwrap();
        assert!(client.info().extended_headers && client.info().structured_replies);
        client.trim(1 << 30, 6 << 30).await.unwrap();
        client
            .write(0, Bytes::from_static(b"hello"), true)
            .await
            .unwrap();
        let e = client
            .block_status(0, 8 << 30, "base:allocation")
            .await
            .unwrap();
        assert_eq!(
            e[1],
            Extent {
                offset: 5 << 30,
                length: 3 << 30,
                flags: 1 << 40
            }
        );
        let err = client.flush().await.unwrap_err();
        assert_err(
            &err,
            "ERR_NBD_PROTOCOL",
            "simple reply although extended headers",
        );
        server.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn refused_extended_headers_fall_back_to_32_bit_requests() {
    timeout(TIMEOUT, async {
        let fake = Fake {
            size: 8 << 30,
            ..Fake::default()
        };
        let (client, server) = start(fake, opts(&["base:allocation"]), |mut srv| async move {
            let (r, _) = srv.req().await;
            assert_eq!(
                (r.command, r.length),
                (CMD_BLOCK_STATUS, u64::from(u32::MAX))
            );
            srv.chunk(
                &r,
                true,
                Chunk::BlockStatus {
                    context_id: 1,
                    extents: vec![BlockDescriptor {
                        length: 1 << 30,
                        flags: 0,
                    }],
                },
            )
            .await;
        })
        .await;
        let client = client.unwrap();
        assert!(!client.info().extended_headers && client.info().structured_replies);
        let e = client.trim(0, 6 << 30).await.unwrap_err();
        assert_err(&e, "ERR_INVALID_ARGUMENT", "limit without extended headers");
        // Block status is clamped instead: a shorter answer is allowed anyway.
        let e = client
            .block_status(0, 8 << 30, "base:allocation")
            .await
            .unwrap();
        assert_eq!(
            e,
            vec![Extent {
                offset: 0,
                length: 1 << 30,
                flags: 0
            }]
        );
        server.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn simple_replies_without_structured_replies() {
    timeout(TIMEOUT, async {
        let fake = Fake {
            structured: false,
            ..Fake::default()
        };
        let (client, server) = start(fake, opts(&["base:allocation"]), |mut srv| async move {
            let (r, _) = srv.req().await;
            srv.simple(&r, 0, &pattern(r.offset, r.length as usize))
                .await;
            let (r, payload) = srv.req().await;
            assert_eq!(payload.len(), 1000);
            srv.simple(&r, 0, &[]).await;
            let (r, _) = srv.req().await;
            assert_eq!((r.command, r.flags), (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE));
            srv.simple(&r, 0, &[]).await;
            let (r, _) = srv.req().await;
            srv.simple(&r, NBD_EIO, &[]).await;
            let (r, _) = srv.req().await;
            assert_eq!(r.command, CMD_FLUSH);
            srv.simple(&r, 0, &[]).await;
        })
        .await;
        let client = client.unwrap();
        assert!(!client.info().structured_replies && client.info().meta_contexts.is_empty());
        assert_eq!(
            &client.read(100, 2000).await.unwrap()[..],
            &pattern(100, 2000)[..]
        );
        client
            .write(0, Bytes::from(vec![3u8; 1000]), false)
            .await
            .unwrap();
        client.write_zeroes(0, 4096, false).await.unwrap();
        let e = client.read(512, 512).await.unwrap_err();
        assert_err(
            &e,
            "ERR_NBD_SERVER",
            "server error EIO on READ at offset 512 length 512",
        );
        client.flush().await.unwrap();
        let e = client
            .block_status(0, 4096, "base:allocation")
            .await
            .unwrap_err();
        assert_err(
            &e,
            "ERR_NBD_UNSUPPORTED",
            "\"base:allocation\" was not negotiated",
        );
        server.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn arguments_are_checked_before_sending() {
    timeout(TIMEOUT, async {
        let fake = Fake {
            flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
            size: 1_000_001,
            block_sizes: Some((512, 4096, 65536)),
            ..Fake::default()
        };
        let (client, server) = start(fake, opts(&[]), |mut srv| async move {
            // Only the one valid request ever arrives.
            let (r, _) = srv.req().await;
            assert_eq!((r.offset, r.length), (999_424, 577));
            srv.chunk(
                &r,
                true,
                Chunk::OffsetHole {
                    offset: r.offset,
                    length: 577,
                },
            )
            .await;
        })
        .await;
        let client = client.unwrap();
        let bs = client.info().block_sizes;
        assert_eq!((bs.minimum, bs.preferred, bs.maximum), (512, 4096, 65536));
        let inval = "ERR_INVALID_ARGUMENT";
        let unsup = "ERR_NBD_UNSUPPORTED";
        assert_err(
            &client.read(999_424, 578).await.unwrap_err(),
            inval,
            "beyond the end of export \"disk0\" (1000001 bytes)",
        );
        assert_err(
            &client.read(u64::MAX, 1).await.unwrap_err(),
            inval,
            "beyond the end",
        );
        assert_err(
            &client.read(0, 0).await.unwrap_err(),
            inval,
            "READ of length 0",
        );
        assert_err(
            &client.read(0, 65537).await.unwrap_err(),
            inval,
            "maximum block size 65536",
        );
        assert_err(
            &client
                .read_into(0, 512, crate::buffer::ReadBuffer::new(1000).unwrap(), 600)
                .await
                .unwrap_err(),
            inval,
            "does not fit a 1000 byte buffer at 600",
        );
        assert_err(
            &client
                .write(0, Bytes::from_static(b"x"), false)
                .await
                .unwrap_err(),
            unsup,
            "WRITE on read-only",
        );
        assert_err(
            &client.trim(0, 512).await.unwrap_err(),
            unsup,
            "does not support TRIM",
        );
        assert_err(
            &client.flush().await.unwrap_err(),
            unsup,
            "does not support FLUSH",
        );
        assert_err(
            &client.write_zeroes(0, 512, true).await.unwrap_err(),
            unsup,
            "read-only",
        );
        assert_err(
            &client
                .block_status(0, 512, "qemu:dirty-bitmap:x")
                .await
                .unwrap_err(),
            unsup,
            "\"qemu:dirty-bitmap:x\" was not negotiated",
        );
        assert_eq!(
            client.read(999_424, 577).await.unwrap(),
            Bytes::from(vec![0u8; 577])
        );
        server.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn unknown_export_names_the_export() {
    timeout(TIMEOUT, async {
        let fake = Fake {
            go_error: Some(REP_ERR_UNKNOWN),
            ..Fake::default()
        };
        let (client, _server) = start(fake, opts(&[]), |_srv| async move {}).await;
        let e = client.unwrap_err();
        assert_err(
            &e,
            "ERR_INVALID_ARGUMENT",
            "export \"disk0\" does not exist",
        );
        assert!(e.to_string().contains("no such export here"), "{e}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn in_flight_requests_are_limited() {
    timeout(TIMEOUT, async {
        let mut o = opts(&[]);
        o.max_in_flight = 2;
        let (client, server) = start(Fake::default(), o, |mut srv| async move {
            let a = srv.req().await.0;
            let b = srv.req().await.0;
            // A third request must not arrive before one of the two is answered.
            // (`read` is cancel-safe: when it times out, nothing was consumed.)
            let mut byte = [0u8; 1];
            let early = timeout(Duration::from_millis(200), srv.s.read(&mut byte)).await;
            assert!(
                early.is_err(),
                "a third request arrived while two were in flight"
            );
            for r in [a, b] {
                srv.chunk(
                    &r,
                    true,
                    Chunk::OffsetHole {
                        offset: r.offset,
                        length: r.length as u32,
                    },
                )
                .await;
            }
            for _ in 0..3 {
                let r = srv.req().await.0;
                srv.chunk(
                    &r,
                    true,
                    Chunk::OffsetHole {
                        offset: r.offset,
                        length: r.length as u32,
                    },
                )
                .await;
            }
        })
        .await;
        let client = client.unwrap();
        let results = futures::future::join_all((0..5u64).map(|i| client.read(i * 512, 512))).await;
        assert!(results.iter().all(|r| r.is_ok()));
        server.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection() {
    timeout(TIMEOUT, async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (client, server) = start(Fake::default(), opts(&[]), |mut srv| async move {
            let mut buf = [0u8; 1];
            // EOF (0 bytes) once the client is gone.
            let n = srv.s.read(&mut buf).await.unwrap();
            let _ = tx.send(n);
        })
        .await;
        let client = client.unwrap();
        let clone = client.clone();
        drop(client);
        drop(clone);
        assert_eq!(rx.await.unwrap(), 0);
        server.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn disconnect_sends_disc_and_later_calls_fail_closed() {
    timeout(TIMEOUT, async {
        let (client, server) = start(Fake::default(), opts(&[]), |mut srv| async move {
            let (r, _) = srv.req().await;
            assert_eq!(r.command, CMD_DISC);
            // The server hangs up after DISC.
        })
        .await;
        let client = client.unwrap();
        client.disconnect().await.unwrap();
        assert_err(
            &client.read(0, 512).await.unwrap_err(),
            "ERR_NBD_CLOSED",
            "the client disconnected",
        );
        assert!(client.disconnect().await.unwrap_err().is_closed());
        server.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn error_offset_outside_the_request_fails_it() {
    broken_reply(
        |r| {
            let e = ErrorChunk {
                chunk_type: REPLY_TYPE_ERROR_OFFSET,
                error: NBD_EIO,
                message: String::new(),
                offset: Some(r.offset + r.length),
            };
            last_chunk(&r, Chunk::Error(e))
        },
        "an ERROR_OFFSET offset [8192, 8193) outside the READ request",
    )
    .await;
}

#[tokio::test]
async fn none_chunk_without_done_fails_the_request() {
    broken_reply(
        |r| {
            let mut b = BytesMut::new();
            encode_chunk(r.cookie, 0, &Chunk::None, false, 0, &mut b);
            b
        },
        "NONE chunk without the DONE flag",
    )
    .await;
}

#[tokio::test]
async fn a_silent_socket_fails_the_handshake_in_time() {
    timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        // Accepts, then says nothing: a guest agent's socket given by mistake.
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(conn);
        });
        let uri = NbdUri::parse(&format!("nbd+unix:///?socket={}", path.display())).unwrap();
        let mut opts = ConnectOptions::new(uri);
        opts.handshake_timeout = Duration::from_millis(200);
        let started = std::time::Instant::now();
        let err = NbdClient::connect(&opts).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(err.code(), "ERR_NBD_IO");
        let text = err.to_string();
        assert!(text.contains("silent.sock"), "names the socket: {text}");
        assert!(text.contains("no NBD handshake within 200ms"), "{text}");

        opts.handshake_timeout = Duration::ZERO;
        assert_eq!(
            NbdClient::connect(&opts).await.unwrap_err().code(),
            "ERR_INVALID_ARGUMENT"
        );
        server.abort();
    })
    .await
    .unwrap();
}
