//! The JavaScript binding: type conversion only. Every function returns `napi::Result`, and core
//! errors cross with their stable code (see `error.rs`).

// Exported functions are reached through napi's registration, which test builds do not see.
#![cfg_attr(test, allow(dead_code))]

mod chunkjob;
mod chunkstore;
mod chunkverify;
mod client;
mod copy;
mod digests;
mod error;
mod lock;
mod nbdserver;
mod restore;

use napi_derive::napi;

/// Version of the native core, for diagnostics.
#[napi]
pub fn native_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// JS numbers hold integers exactly up to 2^53; disk offsets stay far below that.
fn to_u64(v: i64, what: &str) -> napi::Result<u64> {
    u64::try_from(v).map_err(|_| {
        error::to_napi(crate::error::Error::invalid_argument(format!(
            "{what} must not be negative, got {v}"
        )))
    })
}

fn to_js(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
