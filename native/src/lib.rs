//! Native core of pve-backup-provider.
//!
//! Plain Rust modules own the protocol (`nbd`), planning (`plan`), copying (`engine`) and
//! destinations (`sink`); `napi/` only converts types for JavaScript.
pub mod error;
pub mod nbd;
pub mod sink;

mod napi;
