//! The server against the project's own client and against hand-written requests, over real
//! unix sockets in a fresh folder: negotiation, reads, block status, refused writes, several
//! connections with many requests in flight, a failing read, stop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::BufMut;
use tokio::time::timeout;

use super::*;
use crate::error::{NBD_EIO, NBD_EPERM};
use crate::nbd::codec::*;
use crate::nbd::{ConnectOptions, NbdClient, NbdUri};
use crate::source::{CONTEXT_ALLOCATION, FLAG_HOLE, FLAG_ZERO};

const T: Duration = Duration::from_secs(20);
const BLOCK: u64 = 64 << 10;

/// A disk in memory: 64 KiB blocks, all-zero ones reported as holes; reads touching `bad` fail;
/// each read waits a little, so that requests overlap.
struct MemDisk {
    data: Vec<u8>,
    bad: Option<(u64, u64)>,
    reads: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl MemDisk {
    fn new(data: Vec<u8>) -> MemDisk {
        MemDisk {
            data,
            bad: None,
            reads: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        }
    }
}

impl ReadOnlyDisk for Arc<MemDisk> {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        self.reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let end = offset + u64::from(length);
        if let Some((a, b)) = self.bad {
            if offset < b && a < end {
                return Err(Error::corrupt(format!(
                    "chunks/ab/cd/abcd is damaged (at {a})"
                )));
            }
        }
        Ok(Bytes::copy_from_slice(
            &self.data[offset as usize..end as usize],
        ))
    }

    async fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = (offset + length).min(self.size());
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block_end = ((pos / BLOCK + 1) * BLOCK).min(self.size());
            let zero = self.data[pos as usize..block_end as usize]
                .iter()
                .all(|&b| b == 0);
            out.push(Extent {
                offset: pos,
                length: block_end - pos,
                flags: if zero { FLAG_HOLE | FLAG_ZERO } else { 0 },
            });
            pos = block_end;
        }
        Ok(out)
    }
}

/// 1 MiB + 512: data, a zero area [256 KiB, 512 KiB), data to the odd end.
fn content() -> Vec<u8> {
    let mut d: Vec<u8> = (0..(1 << 20) + 512)
        .map(|i: usize| (i % 251) as u8 | 1)
        .collect();
    d[256 << 10..512 << 10].fill(0);
    d
}

struct Running {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    server: NbdServer,
    log: Arc<Mutex<Vec<String>>>,
}

async fn start(disks: Vec<(&str, Arc<MemDisk>)>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let exports = disks
        .into_iter()
        .map(|(name, disk)| Export {
            name: name.to_string(),
            disk,
        })
        .collect();
    let server = NbdServer::start(
        &socket,
        exports,
        Arc::new(move |m: &str| sink.lock().unwrap().push(m.to_string())),
    )
    .await
    .unwrap();
    Running {
        _dir: dir,
        socket,
        server,
        log,
    }
}

async fn client(socket: &Path, export: &str) -> Result<NbdClient> {
    let mut o = ConnectOptions::new(NbdUri::unix(socket, export));
    o.meta_contexts = vec![CONTEXT_ALLOCATION.to_string()];
    NbdClient::connect(&o).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_reads_and_allocation_read_only_with_multi_conn() {
    timeout(T, async {
        let data = content();
        let disk = Arc::new(MemDisk::new(data.clone()));
        let r = start(vec![("drive-scsi0", disk.clone())]).await;
        let mode = std::fs::metadata(&r.socket).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        let c = client(&r.socket, "drive-scsi0").await.unwrap();
        let info = c.info().clone();
        assert_eq!(info.size, data.len() as u64);
        assert!(info.read_only() && info.can_multi_conn() && info.structured_replies);
        assert_eq!(info.block_sizes.maximum, MAX_READ);
        assert!(info.context_id(CONTEXT_ALLOCATION).is_some());
        // the odd tail, a read across data and zeros, the whole disk
        assert_eq!(&c.read(1 << 20, 512).await.unwrap()[..], &data[1 << 20..]);
        assert_eq!(
            &c.read(200 << 10, 100 << 10).await.unwrap()[..],
            &data[200 << 10..300 << 10]
        );
        assert_eq!(&c.read(0, data.len() as u32).await.unwrap()[..], &data[..]);
        let map = c
            .block_status_all(0, data.len() as u64, CONTEXT_ALLOCATION)
            .await
            .unwrap();
        let e = |offset, length, flags| Extent {
            offset,
            length,
            flags,
        };
        assert_eq!(
            map,
            vec![
                e(0, 256 << 10, 0),
                e(256 << 10, 256 << 10, FLAG_HOLE | FLAG_ZERO),
                e(512 << 10, (512 << 10) + 512, 0)
            ]
        );
        // the default export (empty name) is the first one; an unknown one is refused
        let d = client(&r.socket, "").await.unwrap();
        assert_eq!(d.info().size, data.len() as u64);
        let e = client(&r.socket, "nope").await.unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        c.disconnect().await.unwrap();
        d.disconnect().await.unwrap();
        r.server.stop().await;
        assert!(!r.socket.exists());
        assert!(
            r.log.lock().unwrap().is_empty(),
            "{:?}",
            r.log.lock().unwrap()
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_with_many_requests_in_flight() {
    timeout(T, async {
        let data = content();
        let disk = Arc::new(MemDisk::new(data.clone()));
        let r = start(vec![("a", disk.clone()), ("b", disk.clone())]).await;
        let mut reads = Vec::new();
        for export in ["a", "b", "a"] {
            let c = client(&r.socket, export).await.unwrap();
            for i in 0..32u64 {
                let c = c.clone();
                let offset = (i * 31 * 1024) % ((1 << 20) - 4096);
                reads.push(tokio::spawn(
                    async move { (offset, c.read(offset, 4096).await) },
                ));
            }
        }
        for t in reads {
            let (offset, got) = t.await.unwrap();
            assert_eq!(
                &got.unwrap()[..],
                &data[offset as usize..offset as usize + 4096]
            );
        }
        assert_eq!(disk.reads.load(Ordering::SeqCst), 96);
        // requests overlapped: more than one connection's worth, and several per connection
        assert!(disk.most_in_flight.load(Ordering::SeqCst) > MAX_IN_FLIGHT / 2);
        r.server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_read_is_eio_for_that_read_alone_and_logged() {
    timeout(T, async {
        let mut disk = MemDisk::new(content());
        disk.bad = Some((600 << 10, 610 << 10));
        let r = start(vec![("d", Arc::new(disk))]).await;
        let c = client(&r.socket, "d").await.unwrap();
        let e = c.read(512 << 10, 256 << 10).await.unwrap_err();
        let s = e.server_error().expect("a server error");
        assert_eq!((s.errno, s.command), (NBD_EIO, "READ"));
        assert!(
            s.message
                .as_deref()
                .unwrap_or("")
                .contains("chunks/ab/cd/abcd is damaged"),
            "{e}"
        );
        // the connection goes on
        assert_eq!(c.read(0, 512).await.unwrap().len(), 512);
        let log = r.log.lock().unwrap().clone();
        assert_eq!(log.len(), 1);
        assert!(
            log[0].contains("READ at 524288 length 262144 of export d failed"),
            "{log:?}"
        );
        assert!(log[0].contains("chunks/ab/cd/abcd"), "{log:?}");
        r.server.stop().await;
    })
    .await
    .unwrap();
}

/// Reads exactly `n` bytes.
async fn take(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await.unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_simple_replies_and_refused_writes_keep_the_stream_in_step() {
    timeout(T, async {
        let data = content();
        let r = start(vec![("d", Arc::new(MemDisk::new(data.clone())))]).await;
        let mut s = UnixStream::connect(&r.socket).await.unwrap();
        let g = take(&mut s, GREETING_LEN).await;
        assert_eq!(
            decode_greeting(&g).unwrap(),
            Greeting::Newstyle {
                flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
            }
        );
        s.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .await
            .unwrap();
        let mut o = BytesMut::new();
        encode_option(OPT_EXPORT_NAME, b"d", &mut o);
        s.write_all(&o).await.unwrap();
        let answer = take(&mut s, 10).await;
        assert_eq!(&answer[..8], &(data.len() as u64).to_be_bytes());
        assert_eq!(&answer[8..], &EXPORT_FLAGS.to_be_bytes());
        let request = |command, cookie, offset, length| {
            let mut b = BytesMut::new();
            encode_request(
                &Request {
                    flags: 0,
                    command,
                    cookie,
                    offset,
                    length,
                },
                false,
                &mut b,
            )
            .unwrap();
            b
        };
        let mut w = request(CMD_WRITE, 1, 0, 4096);
        w.put_bytes(0xee, 4096);
        s.write_all(&w).await.unwrap();
        s.write_all(&request(CMD_FLUSH, 2, 0, 0)).await.unwrap();
        s.write_all(&request(CMD_TRIM, 3, 0, 4096)).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            match decode_reply_header(&take(&mut s, SIMPLE_REPLY_LEN).await).unwrap() {
                ReplyHeader::Simple { error, cookie } => seen.push((cookie, error)),
                other => panic!("{other:?}"),
            }
        }
        seen.sort();
        assert_eq!(seen, vec![(1, NBD_EPERM), (2, 0), (3, NBD_EPERM)]);
        s.write_all(&request(CMD_READ, 4, 8, 16)).await.unwrap();
        assert_eq!(
            decode_reply_header(&take(&mut s, SIMPLE_REPLY_LEN).await).unwrap(),
            ReplyHeader::Simple {
                error: 0,
                cookie: 4
            }
        );
        assert_eq!(take(&mut s, 16).await, &data[8..24]);
        s.write_all(&request(CMD_DISC, 5, 0, 0)).await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        r.server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_open_connections_and_refuses_an_existing_socket() {
    timeout(T, async {
        let r = start(vec![("d", Arc::new(MemDisk::new(content())))]).await;
        let c = client(&r.socket, "d").await.unwrap();
        let clash = NbdServer::start(
            &r.socket,
            vec![Export {
                name: "x".into(),
                disk: Arc::new(MemDisk::new(vec![1; 512])),
            }],
            Arc::new(|_: &str| {}),
        )
        .await;
        assert!(clash.is_err());
        r.server.stop().await;
        assert!(c.read(0, 512).await.is_err());
    })
    .await
    .unwrap();
}

/// The socket's name appears in its folder only once it is 0600: its mode is never changed
/// there (no IN_ATTRIB for it), so no other user can connect in between. inotify on the folder
/// sees every step in order, so this does not depend on timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_appears_private_and_is_never_chmod_ed_in_place() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    // SAFETY: plain inotify calls on a descriptor this test owns; the path is NUL-terminated.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(fd >= 0);
    let cpath = std::ffi::CString::new(dir.path().as_os_str().as_bytes()).unwrap();
    let wd =
        unsafe { libc::inotify_add_watch(fd, cpath.as_ptr(), libc::IN_CREATE | libc::IN_ATTRIB) };
    assert!(wd >= 0);
    let server = NbdServer::start(
        &socket,
        vec![Export {
            name: "d".into(),
            disk: Arc::new(MemDisk::new(content())),
        }],
        Arc::new(|_: &str| {}),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: reads into a buffer of the length given.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    unsafe { libc::close(fd) };
    assert!(n > 0, "no inotify event at all");
    let mut events = Vec::new();
    let mut at = 0usize;
    while at < n as usize {
        let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().unwrap());
        let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
        let name = &buf[at + 16..at + 16 + len];
        let name = String::from_utf8_lossy(name)
            .trim_end_matches('\0')
            .to_string();
        events.push((name, mask));
        at += 16 + len;
    }
    let on_socket: Vec<u32> = events
        .iter()
        .filter(|(name, _)| name == "nbd.sock")
        .map(|(_, m)| *m)
        .collect();
    assert!(
        on_socket.iter().any(|m| m & libc::IN_CREATE != 0),
        "the socket was created in its folder: {events:?}"
    );
    assert!(
        on_socket.iter().all(|m| m & libc::IN_ATTRIB == 0),
        "the socket's mode was changed after it appeared (others could connect before): {events:?}"
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // the private folder it was made in is gone
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("nbd.sock")]);
    client(&socket, "d").await.unwrap();
    server.stop().await;
}
