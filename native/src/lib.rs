//! Native core of pve-backup-provider.
//!
//! Plain Rust modules own the protocol (`nbd`), planning (`plan`), copying (`engine`) and
//! destinations (`sink`); `napi/` only converts types for JavaScript.
pub mod buffer;
pub mod copy;
pub mod engine;
pub mod error;
pub mod nbd;
pub mod plan;
pub mod ratelimit;
pub mod sink;
pub mod source;

mod napi;
