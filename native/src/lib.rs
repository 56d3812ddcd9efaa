//! Native core of pve-backup-provider.
//!
//! Plain Rust modules own the protocol, planning, copying and sinks; `napi/` only converts types.
pub mod error;

mod napi;
