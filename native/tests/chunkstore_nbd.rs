//! The chunk store's backup and restore against a real NBD export: qemu-nbd serving a qcow2
//! image with a persistent dirty bitmap, written by qemu-io. A full backup, writes, an
//! incremental backup with the bitmap, and restores of both compared byte for byte with
//! `qemu-img convert` of the image. A fresh temporary folder per test; a missing tool fails
//! with how to install it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pve_backup_provider_native::chunkstore::backup::{backup, BackupOptions, BackupSummary};
use pve_backup_provider_native::chunkstore::format::FixedIndex;
use pve_backup_provider_native::chunkstore::key::StoreKey;
use pve_backup_provider_native::chunkstore::memory::MemoryObjects;
use pve_backup_provider_native::chunkstore::restore::{restore, ChunkRestoreOptions};
use pve_backup_provider_native::chunkstore::sink::known_digests;
use pve_backup_provider_native::chunkstore::Objects;
use pve_backup_provider_native::error::Result;
use pve_backup_provider_native::plan::Region;
use tokio_util::sync::CancellationToken;

const INSTALL: &str = "apt-get install qemu-utils";
const MIB: u64 = 1 << 20;
/// 10 chunks of 4 MiB and a last one of 4 KiB.
const SIZE: u64 = 40 * MIB + 4096;

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

impl Server {
    /// Stops qemu-nbd with SIGTERM and waits: it then stores the persistent bitmap cleanly (a
    /// killed qemu-nbd leaves it marked in use, "inconsistent").
    fn stop(mut self) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait();
        assert!(status.is_ok_and(|s| s.success() || s.code().is_none()));
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }
}

/// qemu-nbd serving `image` writable (an enabled bitmap cannot be exported read-only),
/// persistent, with `bitmap` exported when given.
fn qemu_nbd(dir: &Path, image: &Path, bitmap: Option<&str>) -> Server {
    let socket = dir.join("qemu-nbd.sock");
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg("-k")
        .arg(&socket)
        .args(["-f", "qcow2", "-x", "disk", "-t"]);
    if let Some(b) = bitmap {
        cmd.args(["-B", b]);
    }
    let child = cmd
        .arg(image)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run qemu-nbd ({e}): {INSTALL}"));
    let mut server = Server { child, socket };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&server.socket).is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("qemu-nbd exited with {status} before listening");
        }
        assert!(
            Instant::now() < deadline,
            "qemu-nbd did not listen within 10s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
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

/// qemu-io writes, `(pattern, offset, length)`.
fn write(image: &Path, writes: &[(u8, u64, u64)]) {
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for (p, o, l) in writes {
        args.push("-c".into());
        args.push(format!("write -P {p} {o} {l}"));
    }
    args.push(image.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args);
}

/// The image's content, by `qemu-img convert` to raw.
fn content(dir: &Path, image: &Path, name: &str) -> Vec<u8> {
    let raw = dir.join(name);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            &image.display().to_string(),
            &raw.display().to_string(),
        ],
    );
    std::fs::read(&raw).unwrap_or_else(|e| panic!("reading {}: {e}", raw.display()))
}

fn options(uri: String, index_key: &str, key: Option<Arc<StoreKey>>) -> BackupOptions {
    BackupOptions {
        uri,
        bitmap: None,
        dirty: None,
        previous: None,
        known: Default::default(),
        key,
        chunk_size: 0,
        discard: false,
        bandwidth_limit: None,
        dedup_by_head: false,
        index_key: index_key.into(),
        uploads: 0,
        fill_from_previous: false,
        connections: 0,
        request_timeout: Some(Duration::from_secs(60)),
    }
}

async fn index(store: &MemoryObjects, key: &str) -> Result<FixedIndex> {
    let obj = store.get(key).await?.unwrap_or_default();
    FixedIndex::decode(key, &obj)
}

async fn restored(
    store: &Arc<MemoryObjects>,
    index: FixedIndex,
    key: Option<Arc<StoreKey>>,
    target: PathBuf,
) -> Result<Vec<u8>> {
    restore(ChunkRestoreOptions {
        objects: store.clone(),
        index,
        index_name: "disk.fidx".into(),
        key,
        target: target.clone(),
        zeroed: true,
        fetches: 0,
        bandwidth_limit: None,
        cancel: CancellationToken::new(),
        progress: None,
    })
    .await?;
    Ok(std::fs::read(&target).unwrap_or_default())
}

/// Full backup, writes, incremental backup (bitmap or dirty regions), both restored exactly.
async fn full_then_incremental(with_bitmap: bool, key: Option<Arc<StoreKey>>) -> Result<()> {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let dir = tmp.path();
    let image = dir.join("disk.qcow2");
    let img = image.display().to_string();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img, &SIZE.to_string()],
    );
    write(
        &image,
        &[
            (0x11, 0, 3 * MIB),
            (0x22, 9 * MIB, 2 * MIB),
            (0x33, 20 * MIB, 5 * MIB),
            (0x44, 40 * MIB, 4096),
        ],
    );
    run("qemu-img", &["bitmap", "--add", &img, "b0"]);
    let before = content(dir, &image, "before.raw");
    let store = Arc::new(MemoryObjects::new());
    let objects: Arc<dyn Objects> = store.clone();
    let cancel = CancellationToken::new();

    // full
    let server = qemu_nbd(dir, &image, None);
    let full: BackupSummary = backup(
        options(server.uri(), "b/1/disk.fidx", key.clone()),
        objects.clone(),
        &|_| {},
        &cancel,
    )
    .await?;
    server.stop();
    let c = &full.chunks;
    assert_eq!(c.chunks, 11);
    // chunks 0, 2, 5, 6 and 10 hold data; 1, 3, 4, 7, 8 and 9 are zero
    assert_eq!((c.uploaded, c.zero, c.unchanged), (5, 6, 0));
    let index0 = index(&store, "b/1/disk.fidx").await?;
    assert!(restored(&store, index0.clone(), key.clone(), dir.join("r0.raw")).await? == before);

    // writes: inside chunk 2, across chunks 9 and 10 (the short last one)
    let writes = [
        (0x55u8, 9 * MIB + 512 * 1024, 100 * 1024),
        (0x66, 40 * MIB - 8192, 12288),
    ];
    write(&image, &writes);
    let after = content(dir, &image, "after.raw");
    assert!(after != before);

    let server = qemu_nbd(dir, &image, with_bitmap.then_some("b0"));
    let mut o = options(server.uri(), "b/2/disk.fidx", key.clone());
    o.previous = Some(index0.clone());
    o.known = known_digests([&index0]);
    if with_bitmap {
        o.bitmap = Some("b0".into());
    } else {
        o.dirty = Some(
            writes
                .iter()
                .map(|&(_, offset, length)| Region { offset, length })
                .collect(),
        );
    }
    // a previous backup of another size is refused before anything is read
    let mut grown = index0.clone();
    grown.size += 4096;
    let refused = BackupOptions {
        previous: Some(grown),
        bitmap: o.bitmap.clone(),
        dirty: o.dirty.clone(),
        ..options(server.uri(), "b/3/disk.fidx", key.clone())
    };
    let e = backup(refused, objects.clone(), &|_| {}, &cancel)
        .await
        .err();
    assert_eq!(e.map(|e| e.code()), Some("ERR_INVALID_ARGUMENT"));
    let puts = store.puts();
    let inc = backup(o, objects.clone(), &|_| {}, &cancel).await?;
    server.stop();
    let c = &inc.chunks;
    assert_eq!((c.uploaded, c.unchanged, c.zero), (3, 8, 0), "{c:?}");
    assert_eq!(store.puts() - puts, 4, "three chunks and the index");
    // chunks 2 and 9 whole, and the last 4 KiB chunk
    assert_eq!(inc.copy.bytes_read + inc.copy.bytes_zero, 8 * MIB + 4096);
    let index1 = index(&store, "b/2/disk.fidx").await?;
    assert!(restored(&store, index1, key.clone(), dir.join("r1.raw")).await? == after);
    // the full backup still restores as it was
    assert!(restored(&store, index0, key, dir.join("r0b.raw")).await? == before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_and_bitmap_incremental_restore_exactly() -> Result<()> {
    full_then_incremental(true, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_store_with_dirty_regions_restores_exactly() -> Result<()> {
    let key = Arc::new(StoreKey::from_master(&[42; 32]));
    full_then_incremental(false, Some(key)).await
}

/// qemu-storage-daemon exporting a snapshot-access node over a copy-before-write filter
/// restricted to bitmap `b0` of `image`, as backup access does (reads outside the bitmap fail
/// with EINVAL), writable so that taken ranges can be discarded.
fn snapshot_export(dir: &Path, image: &Path, fleece: &Path) -> Server {
    let socket = dir.join("qsd.sock");
    let _ = std::fs::remove_file(&socket);
    let blockdevs = [
        format!(
            r#"{{"driver":"file","filename":"{}","node-name":"f0"}}"#,
            image.display()
        ),
        r#"{"driver":"qcow2","file":"f0","node-name":"disk"}"#.to_string(),
        format!(
            r#"{{"driver":"file","filename":"{}","node-name":"f1"}}"#,
            fleece.display()
        ),
        r#"{"driver":"qcow2","file":"f1","node-name":"fleece"}"#.to_string(),
        r#"{"driver":"copy-before-write","file":"disk","target":"fleece","node-name":"cbw","bitmap":{"node":"disk","name":"b0"}}"#.to_string(),
        r#"{"driver":"snapshot-access","file":"cbw","node-name":"snap"}"#.to_string(),
    ];
    let mut cmd = Command::new("qemu-storage-daemon");
    for b in &blockdevs {
        cmd.arg("--blockdev").arg(b);
    }
    cmd.arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", socket.display()))
        .arg("--export")
        .arg(r#"{"type":"nbd","id":"e","node-name":"snap","name":"disk","writable":true,"bitmaps":[{"node":"disk","name":"b0"}]}"#);
    let child = cmd.stdin(Stdio::null()).spawn().unwrap_or_else(|e| {
        panic!("cannot run qemu-storage-daemon ({e}): apt-get install qemu-system-common")
    });
    let mut server = Server { child, socket };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&server.socket).is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("qemu-storage-daemon exited with {status} before listening");
        }
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not listen within 10s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// A 64 KiB bitmap on a real bitmap-restricted snapshot export: widened reads are refused
/// (EINVAL), chunks dirty in part completed from the previous backup restore exactly, and the
/// ranges taken are discarded on the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_snapshot_with_a_fine_bitmap_completes_chunks_from_the_previous_backup(
) -> Result<()> {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let dir = tmp.path();
    let image = dir.join("disk.qcow2");
    let img = image.display().to_string();
    let size = 24 * MIB;
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img, &size.to_string()],
    );
    write(&image, &[(0x11, 0, 10 * MIB), (0x22, 16 * MIB, 8 * MIB)]);
    let store = Arc::new(MemoryObjects::new());
    let objects: Arc<dyn Objects> = store.clone();
    let cancel = CancellationToken::new();
    let server = qemu_nbd(dir, &image, None);
    backup(
        options(server.uri(), "b/1/disk.fidx", None),
        objects.clone(),
        &|_| {},
        &cancel,
    )
    .await?;
    server.stop();
    let index0 = index(&store, "b/1/disk.fidx").await?;

    // a 64 KiB bitmap, then writes inside chunks 0 (in data), 2 (data and zeros) and 3 (zeros)
    run("qemu-img", &["bitmap", "--add", "-g", "65536", &img, "b0"]);
    write(
        &image,
        &[
            (0x33, MIB, 64 * 1024),
            (0x44, 10 * MIB - 64 * 1024, 128 * 1024),
            (0x55, 13 * MIB, 4096),
        ],
    );
    let after = content(dir, &image, "after.raw");
    let fleece = dir.join("fleece.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            &fleece.display().to_string(),
            &size.to_string(),
        ],
    );
    let server = snapshot_export(dir, &image, &fleece);

    let mut o = options(server.uri(), "b/2/disk.fidx", None);
    o.bitmap = Some("b0".into());
    o.previous = Some(index0.clone());
    let e = backup(o, objects.clone(), &|_| {}, &cancel).await.err();
    assert!(e.as_ref().is_some_and(|e| e.is_server_einval()), "{e:?}");
    assert!(store.get("b/2/disk.fidx").await?.is_none());

    let mut o = options(server.uri(), "b/2/disk.fidx", None);
    o.bitmap = Some("b0".into());
    o.previous = Some(index0.clone());
    o.known = known_digests([&index0]);
    o.fill_from_previous = true;
    o.discard = true;
    let inc = backup(o, objects.clone(), &|_| {}, &cancel).await?;
    server.stop();
    let c = &inc.chunks;
    assert_eq!((c.completed, c.uploaded, c.unchanged), (3, 3, 3), "{c:?}");
    // only the dirty 64 KiB clusters were read, and discarded once taken
    assert_eq!(inc.copy.bytes_read + inc.copy.bytes_zero, 4 * 64 * 1024);
    assert_eq!(inc.copy.bytes_trimmed, 4 * 64 * 1024);
    let index1 = index(&store, "b/2/disk.fidx").await?;
    assert!(restored(&store, index1, None, dir.join("r1.raw")).await? == after);
    Ok(())
}
