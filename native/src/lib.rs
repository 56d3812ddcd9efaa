//! Native core of pve-backup-provider.
//!
//! Plain Rust modules own the protocol (`nbd`), planning (`plan`), copying (`engine`) and
//! destinations (`sink`); `copy` is one copy run from a URI; `napi/` only converts types for
//! JavaScript. The planner and the engine see only the `Source` and `Sink` traits (checked by
//! `layering`).
pub mod buffer;
pub mod chunkstore;
pub mod copy;
pub mod digests;
pub mod engine;
pub mod error;
pub mod lock;
pub mod nbd;
pub mod plan;
pub mod ratelimit;
pub mod restore;
pub mod sink;
pub mod source;
pub mod zero;

mod napi;

#[cfg(test)]
mod layering;
