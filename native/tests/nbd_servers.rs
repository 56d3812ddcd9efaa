//! The NBD client against real servers (nbdkit, qemu-nbd) on private unix sockets in a fresh
//! temporary folder per test. A missing tool fails the test with how to install it; nothing is
//! skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pve_backup_provider_native::error::NBD_EIO;
use pve_backup_provider_native::nbd::{
    list_meta_contexts, ConnectOptions, Extent, NbdClient, NbdUri,
};
use tempfile::TempDir;
use tokio::time::timeout;

const TIMEOUT: Duration = Duration::from_secs(60);
const INSTALL: &str = "apt-get install qemu-utils nbdkit";

/// A server process, killed when the test ends (pass or fail).
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(program: &str, args: &[&str], socket: PathBuf) -> Server {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): {INSTALL}"));
    let mut server = Server { child, socket };
    let deadline = Instant::now() + Duration::from_secs(10);
    // Probe with a real connection: the socket file exists a moment before listen(). (The
    // servers log a harmless "Broken pipe" for each probe.)
    while std::os::unix::net::UnixStream::connect(&server.socket).is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!(
                "{program} exited with {status} before listening on {}",
                server.socket.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{program} did not listen on {} within 10s",
            server.socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

fn nbdkit(dir: &Path, args: &[&str]) -> Server {
    let socket = dir.join("nbdkit.sock");
    let s = socket.to_string_lossy().into_owned();
    let mut all = vec!["-U", &s, "-f", "--exit-with-parent"];
    all.extend_from_slice(args);
    spawn("nbdkit", &all, socket)
}

/// qemu-nbd serving `image` (persistent, so the readiness probe does not use up the export).
fn qemu_nbd(dir: &Path, image: &Path, extra: &[&str]) -> Server {
    let socket = dir.join("qemu-nbd.sock");
    let s = socket.to_string_lossy().into_owned();
    let img = image.to_string_lossy().into_owned();
    let mut all = vec!["-k", &s, "-f", "qcow2", "-x", "disk", "-t"];
    all.extend_from_slice(extra);
    all.push(&img);
    spawn("qemu-nbd", &all, socket)
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): {INSTALL}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn options(server: &Server, export: &str, meta: &[&str]) -> ConnectOptions {
    let mut o = ConnectOptions::new(NbdUri::unix(&server.socket, export));
    o.meta_contexts = meta.iter().map(|s| s.to_string()).collect();
    o
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) * 7 % 253) as u8)
        .collect()
}

#[tokio::test]
async fn nbdkit_memory_read_write_trim_flush_round_trip() {
    let dir = TempDir::new().unwrap();
    let server = nbdkit(dir.path(), &["memory", "size=16M"]);
    timeout(TIMEOUT, async {
        let client = NbdClient::connect(&options(&server, "", &["base:allocation"]))
            .await
            .unwrap();
        let info = client.info().clone();
        assert_eq!(info.size, 16 << 20);
        assert!(info.structured_replies && !info.read_only());
        assert!(info.can_trim() && info.can_flush() && info.can_write_zeroes() && info.can_fua());
        assert!(info.context_id("base:allocation").is_some());

        let data = pattern(4096, 1 << 20);
        client
            .write(4096, Bytes::from(data.clone()), true)
            .await
            .unwrap();
        assert_eq!(&client.read(4096, 1 << 20).await.unwrap()[..], &data[..]);

        // 64 pipelined reads from clones of the handle (more than the 16 in flight at once).
        let reads = (0..64u64).map(|i| {
            let c = client.clone();
            async move { (i, c.read(4096 + i * 16384, 16384).await.unwrap()) }
        });
        for (i, got) in futures::future::join_all(reads).await {
            let start = (i * 16384) as usize;
            assert_eq!(&got[..], &data[start..start + 16384], "read {i}");
        }

        client.write_zeroes(8192, 4096, false).await.unwrap();
        assert!(client
            .read(8192, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        client.trim(65536, 65536).await.unwrap();
        assert!(client
            .read(65536, 65536)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        client.flush().await.unwrap();

        let extents = client
            .block_status_all(0, 16 << 20, "base:allocation")
            .await
            .unwrap();
        assert_eq!(extents.first().map(|e| e.offset), Some(0));
        assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), 16 << 20);
        // The untouched tail of the memory disk is a hole.
        assert_eq!(extents.last().map(|e| e.flags & 1), Some(1));

        client.disconnect().await.unwrap();
        let e = client.read(0, 512).await.unwrap_err();
        assert_eq!(e.code(), "ERR_NBD_CLOSED", "{e}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn nbdkit_export_size_not_a_multiple_of_512() {
    let dir = TempDir::new().unwrap();
    let server = nbdkit(dir.path(), &["memory", "size=1000001"]);
    timeout(TIMEOUT, async {
        let client = NbdClient::connect(&options(&server, "", &["base:allocation"]))
            .await
            .unwrap();
        assert_eq!(client.info().size, 1_000_001);
        let tail = pattern(999_990, 11);
        client
            .write(999_990, Bytes::from(tail.clone()), false)
            .await
            .unwrap();
        assert_eq!(&client.read(999_990, 11).await.unwrap()[..], &tail[..]);
        assert_eq!(client.read(1_000_000, 1).await.unwrap()[0], tail[10]);
        let e = client.read(1_000_000, 2).await.unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{e}");
        // The refused request did not hurt the connection.
        let all = client
            .block_status_all(0, 1_000_001, "base:allocation")
            .await
            .unwrap();
        assert_eq!(all.iter().map(|e| e.length).sum::<u64>(), 1_000_001);
        let last = client
            .block_status(999_999, 2, "base:allocation")
            .await
            .unwrap();
        assert_eq!(last.iter().map(|e| e.length).sum::<u64>(), 2);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn nbdkit_error_filter_gives_a_server_error_with_errno_and_offset() {
    let dir = TempDir::new().unwrap();
    let server = nbdkit(
        dir.path(),
        &[
            "--filter=error",
            "memory",
            "size=1M",
            "error=EIO",
            "error-pread-rate=100%",
        ],
    );
    timeout(TIMEOUT, async {
        let client = NbdClient::connect(&options(&server, "", &[]))
            .await
            .unwrap();
        let e = client.read(4096, 512).await.unwrap_err();
        assert_eq!(e.code(), "ERR_NBD_SERVER", "{e}");
        let se = e.server_error().unwrap();
        assert_eq!(
            (se.errno, se.command, se.offset, se.length),
            (NBD_EIO, "READ", 4096, 512)
        );
        assert!(
            e.to_string()
                .starts_with("server error EIO on READ at offset 4096"),
            "{e}"
        );
        // Only reads fail; the connection is still fine.
        client
            .write(0, Bytes::from_static(&[1; 512]), false)
            .await
            .unwrap();
    })
    .await
    .unwrap();
}

/// A sparse qcow2 with data at [1M, 2M) and [4M, 4M+64K), and a dirty bitmap `b0` that saw
/// only the second write.
fn sparse_qcow2(dir: &Path) -> PathBuf {
    let img = dir.join("sparse.qcow2");
    let p = img.to_string_lossy().into_owned();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &p, "8M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -q -P 0xab 1M 1M", &p],
    );
    run("qemu-img", &["bitmap", "--add", &p, "b0"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -q -P 0xcd 4M 64k", &p],
    );
    img
}

#[tokio::test]
async fn qemu_nbd_block_status_on_a_sparse_qcow2() {
    let dir = TempDir::new().unwrap();
    let img = sparse_qcow2(dir.path());
    let server = qemu_nbd(dir.path(), &img, &["-r", "-B", "b0"]);
    timeout(TIMEOUT, async {
        let uri = NbdUri::unix(&server.socket, "disk");
        let bitmaps = list_meta_contexts(&uri, &["qemu:dirty-bitmap:".to_string()])
            .await
            .unwrap();
        assert_eq!(bitmaps, vec!["qemu:dirty-bitmap:b0".to_string()]);

        let client = NbdClient::connect(&options(
            &server,
            "disk",
            &["base:allocation", "qemu:dirty-bitmap:b0"],
        ))
        .await
        .unwrap();
        assert!(client.info().read_only());
        let alloc = client
            .block_status_all(0, 8 << 20, "base:allocation")
            .await
            .unwrap();
        let data: Vec<(u64, u64)> = alloc
            .iter()
            .filter(|e| e.flags & 1 == 0)
            .map(|e| (e.offset, e.length))
            .collect();
        assert_eq!(
            data,
            vec![(1 << 20, 1 << 20), (4 << 20, 64 << 10)],
            "{alloc:?}"
        );
        assert_eq!(
            alloc[0],
            Extent {
                offset: 0,
                length: 1 << 20,
                flags: 3
            }
        );

        let dirty = client
            .block_status_all(0, 8 << 20, "qemu:dirty-bitmap:b0")
            .await
            .unwrap();
        let dirty: Vec<(u64, u64)> = dirty
            .iter()
            .filter(|e| e.flags & 1 != 0)
            .map(|e| (e.offset, e.length))
            .collect();
        assert_eq!(dirty, vec![(4 << 20, 64 << 10)]);

        let d = client.read(1 << 20, 1 << 20).await.unwrap();
        assert!(d.iter().all(|&b| b == 0xab));
        let hole = client.read(0, 65536).await.unwrap();
        assert!(hole.iter().all(|&b| b == 0));
        assert_eq!(
            client
                .write(0, Bytes::from_static(b"x"), false)
                .await
                .unwrap_err()
                .code(),
            "ERR_NBD_UNSUPPORTED"
        );
        client.disconnect().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn qemu_nbd_unknown_export_names_it() {
    let dir = TempDir::new().unwrap();
    let img = sparse_qcow2(dir.path());
    let server = qemu_nbd(dir.path(), &img, &[]);
    timeout(TIMEOUT, async {
        let e = NbdClient::connect(&options(&server, "nope", &["base:allocation"]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{e}");
        assert!(
            e.to_string().contains("export \"nope\" does not exist"),
            "{e}"
        );
        // Contexts the server does not know are simply absent.
        let client = NbdClient::connect(&options(
            &server,
            "disk",
            &["base:allocation", "qemu:dirty-bitmap:zz"],
        ))
        .await
        .unwrap();
        let names: Vec<&str> = client
            .info()
            .meta_contexts
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, vec!["base:allocation"]);
        assert_eq!(client.info().block_sizes.maximum, 32 << 20);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_stalled_read_times_out_naming_the_request() {
    let dir = TempDir::new().unwrap();
    let server = nbdkit(
        dir.path(),
        &["--filter=delay", "memory", "size=1M", "delay-read=300"],
    );
    timeout(TIMEOUT, async {
        let mut o = options(&server, "", &[]);
        o.request_timeout = Some(Duration::from_millis(500));
        let client = NbdClient::connect(&o).await.unwrap();
        let started = Instant::now();
        let e = client.read(8192, 4096).await.unwrap_err();
        assert_eq!(e.code(), "ERR_NBD_TIMEOUT", "{e}");
        assert!(e.is_timeout());
        assert_eq!(e.request(), Some(("READ", 8192, 4096)));
        assert!(
            e.to_string()
                .contains("no reply to READ at offset 8192 length 4096"),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // The connection is closed (a request that cannot be withdrawn poisons it); later
        // requests still name the request that timed out.
        let later = client.read(0, 512).await.unwrap_err();
        assert_eq!(later.request(), Some(("READ", 8192, 4096)), "{later}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_copy_job_leaves_a_trimmable_source_intact_unless_asked_to_discard() {
    use pve_backup_provider_native::copy::{self, RunOptions, Target};
    use pve_backup_provider_native::engine::CopyOptions;
    use tokio_util::sync::CancellationToken;
    let dir = TempDir::new().unwrap();
    let server = nbdkit(dir.path(), &["memory", "size=4M"]);
    let uri = format!("nbd+unix:///?socket={}", server.socket.display());
    timeout(TIMEOUT, async {
        let writer = NbdClient::connect(&options(&server, "", &[]))
            .await
            .unwrap();
        assert!(writer.info().can_trim());
        writer
            .write(0, Bytes::from(pattern(0, 1 << 20)), false)
            .await
            .unwrap();
        let run = |discard: bool| {
            let uri = uri.clone();
            async move {
                let opts = RunOptions {
                    uri,
                    connections: 1,
                    request_timeout: None,
                    copy: CopyOptions {
                        discard,
                        ..CopyOptions::default()
                    },
                };
                copy::run(opts, Target::Null, &|_| {}, &CancellationToken::new())
                    .await
                    .unwrap()
                    .copy
            }
        };
        let s = run(false).await;
        assert_eq!(s.bytes_trimmed, 0);
        assert_eq!(
            writer.read(0, 1 << 20).await.unwrap(),
            Bytes::from(pattern(0, 1 << 20))
        );
        let s = run(true).await;
        assert_eq!(s.bytes_trimmed, 4 << 20);
        assert_eq!(
            writer.read(0, 1 << 20).await.unwrap(),
            Bytes::from(vec![0u8; 1 << 20])
        );
    })
    .await
    .unwrap();
}
