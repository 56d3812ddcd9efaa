//! A read-only NBD server on a unix socket, over any [`ReadOnlyDisk`].
//!
//! Fixed newstyle negotiation (`negotiate.rs`: EXPORT_NAME, ABORT, LIST, INFO, GO, structured
//! replies, `base:allocation`), then transmission (`transmit.rs`: READ, BLOCK_STATUS, FLUSH as a
//! no-op, DISC; writes refused with EPERM). Exports are read-only and advertise
//! `NBD_FLAG_CAN_MULTI_CONN`; any number of clients, each with several requests in flight.
//! The wire encoding is the client's (`codec.rs`); nothing here knows where a disk's bytes come
//! from (the chunk store's disk is `chunkstore::disk`).

mod negotiate;
mod transmit;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::nbd::codec::{decode_option_header, encode_greeting, OPTION_HEADER_LEN};
use crate::source::Extent;

pub use negotiate::{EXPORT_FLAGS, MAX_READ};
pub use transmit::MAX_IN_FLIGHT;

use negotiate::{ExportEntry, Negotiation, Next, MAX_OPTION_DATA, SERVER_FLAGS};

/// A disk the server exports, read-only. Every method may be called concurrently.
pub trait ReadOnlyDisk: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Exactly `length` bytes at `offset` (`1 <= length <= MAX_READ`, inside the disk). An
    /// error fails this read alone: the client gets EIO and the server logs the error, so it
    /// should say what failed (a chunk disk names the chunk). Never wrong bytes.
    fn read(&self, offset: u64, length: u32) -> impl Future<Output = Result<Bytes>> + Send;

    /// `base:allocation` of `[offset, offset + length)`: extents in order, the first starting
    /// at `offset`, with [`crate::source::FLAG_HOLE`] / [`crate::source::FLAG_ZERO`]. They may
    /// stop before the end of the range (the client asks again) or run past it (clipped).
    fn allocation(
        &self,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = Result<Vec<Extent>>> + Send;
}

/// One export: a name and its disk.
pub struct Export<D> {
    pub name: String,
    pub disk: D,
}

/// Where the server reports what failed (a read's error, a connection broken off).
pub type ServerLog = Arc<dyn Fn(&str) + Send + Sync>;

/// A running server. [`NbdServer::stop`] ends it; dropping it does too (without waiting).
pub struct NbdServer {
    socket: PathBuf,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl NbdServer {
    /// Listens on a new unix socket at `socket` (mode 0600; an existing file there is an error,
    /// never replaced) and serves `exports` until stopped.
    pub async fn start<D: ReadOnlyDisk>(
        socket: &Path,
        exports: Vec<Export<D>>,
        log: ServerLog,
    ) -> Result<NbdServer> {
        if exports.is_empty() {
            return Err(Error::invalid_argument(
                "an NBD server needs at least one export",
            ));
        }
        let listener = bind(socket)?;
        let exports: Arc<Vec<Arc<Export<D>>>> =
            Arc::new(exports.into_iter().map(Arc::new).collect());
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, exports, log, stop.clone()));
        Ok(NbdServer {
            socket: socket.to_path_buf(),
            stop,
            task: Some(task),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops listening, ends every connection, waits for them and removes the socket.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if self.task.is_some() {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// Listens on `socket`, which appears at its path already 0600. A socket is created with the
/// umask's mode, and a chmod after `bind` leaves a moment in which another user may connect and
/// read a guest's disks. So it is bound in a private (0700) folder beside its path, made 0600
/// there, and only then linked into place; a link never replaces a file, so one already at
/// `socket` is refused. The folder goes when this returns.
fn bind(socket: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let at = |what: &str| {
        let what = format!("{what} {}", socket.display());
        move |e| Error::io(what, e)
    };
    let private = PrivateDir::beside(socket).map_err(at("making a private folder beside"))?;
    let inside = private.0.join("socket");
    let listener = UnixListener::bind(&inside).map_err(at("listening on"))?;
    std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))
        .map_err(at("setting the mode of"))?;
    std::fs::hard_link(&inside, socket).map_err(at("listening on"))?;
    Ok(listener)
}

/// A folder only its owner can enter, removed with what is in it when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    /// A new folder beside `path` (same file system, so a link from inside it can reach `path`).
    fn beside(path: &Path) -> std::io::Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        let parent = parent.unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        let mut attempt = 0u32;
        loop {
            let dir = parent.join(format!(".{name}.{}.{attempt}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(PrivateDir(dir)),
                // left by a killed run of a process with the same id: take the next name
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn accept_loop<D: ReadOnlyDisk>(
    listener: UnixListener,
    exports: Arc<Vec<Arc<Export<D>>>>,
    log: ServerLog,
    stop: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok((stream, _)) => {
                let (exports, log, stop) = (exports.clone(), log.clone(), stop.clone());
                connections.spawn(async move {
                    if let Err(e) = connection(stream, &exports, log.clone(), stop).await {
                        log(&format!("NBD connection ended: {e}"));
                    }
                });
            }
            Err(e) => {
                // out of file descriptors and the like: say so, wait a little, go on
                log(&format!("accepting an NBD connection failed: {e}"));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// One client: negotiation, then transmission.
async fn connection<D: ReadOnlyDisk>(
    mut stream: UnixStream,
    exports: &[Arc<Export<D>>],
    log: ServerLog,
    stop: CancellationToken,
) -> Result<()> {
    let entries: Vec<ExportEntry> = exports
        .iter()
        .map(|e| ExportEntry {
            name: e.name.clone(),
            size: e.disk.size(),
        })
        .collect();
    let negotiated = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        n = negotiate(&mut stream, &entries) => n?,
    };
    let Some(session) = negotiated else {
        return Ok(());
    };
    transmit::serve(stream, exports[session.export].clone(), session, log, stop).await
}

/// Runs the handshake; `None` when the client ended it (ABORT, an unknown export with
/// EXPORT_NAME, flags this server does not know).
async fn negotiate(
    stream: &mut UnixStream,
    exports: &[ExportEntry],
) -> Result<Option<negotiate::Session>> {
    let io = |what: &'static str| move |e| Error::io(what, e);
    let mut greeting = BytesMut::new();
    encode_greeting(SERVER_FLAGS, &mut greeting);
    stream
        .write_all(&greeting)
        .await
        .map_err(io("sending the greeting"))?;
    let flags = stream
        .read_u32()
        .await
        .map_err(io("reading the client flags"))?;
    let Some(mut n) = Negotiation::new(exports, flags) else {
        return Ok(None);
    };
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            // a client may hang up between options (after an error reply, say): not a failure
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io("reading an option")(e)),
        }
        let (option, length) = decode_option_header(&header)?;
        if length > MAX_OPTION_DATA {
            return Err(Error::protocol(format!(
                "option {option} with {length} bytes of data"
            )));
        }
        let mut data = vec![0u8; length as usize];
        stream
            .read_exact(&mut data)
            .await
            .map_err(io("reading an option"))?;
        let mut out = BytesMut::new();
        let next = n.option(option, &data, &mut out);
        stream
            .write_all(&out)
            .await
            .map_err(io("answering an option"))?;
        match next {
            Next::Option => continue,
            Next::Close => return Ok(None),
            Next::Transmit(session) => return Ok(Some(session)),
        }
    }
}
