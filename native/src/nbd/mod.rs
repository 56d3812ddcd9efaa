//! The project's own NBD client (fixed newstyle, structured replies, extended headers, meta
//! contexts), split as tokio-postgres is: `codec` encodes and decodes frames with no I/O,
//! `handshake` negotiates, `connection` owns the socket and routes replies by cookie, and
//! `client` is the cheap handle callers use. `source` makes the client the copy engine's
//! [`crate::source::Source`], so that only this folder knows the engine reads from NBD.
//! `server` is the other side: a read-only NBD server over any disk, on the same codec.

mod client;
pub mod codec;
mod connection;
mod handshake;
mod info;
pub mod server;
mod source;
mod uri;

#[cfg(test)]
mod tests;

pub use crate::source::Extent;
pub use client::{
    list_meta_contexts, ConnectOptions, NbdClient, DEFAULT_MAX_IN_FLIGHT, DEFAULT_REQUEST_TIMEOUT,
};
pub use info::{BlockSizes, ExportInfo, MetaContext};
pub use uri::{NbdAddress, NbdUri, DEFAULT_PORT};
