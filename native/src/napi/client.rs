//! Binding of `nbd::NbdClient`: converts numbers and objects, nothing else.

use napi::bindgen_prelude::Buffer;
use napi_derive::napi;

use super::error::IntoNapi;
use super::{to_js, to_u64};
use crate::nbd::{self, ConnectOptions, NbdClient, NbdUri};

#[napi(object)]
pub struct NativeConnectOptions {
    /// Meta contexts to negotiate, e.g. `base:allocation`, `qemu:dirty-bitmap:NAME`.
    pub meta_contexts: Option<Vec<String>>,
    /// Request extended (64-bit) headers when the server offers them; default true.
    pub extended_headers: Option<bool>,
    /// Requests in flight on this connection; default 16.
    pub max_in_flight: Option<u32>,
    /// Limit on connecting plus the handshake, in milliseconds; default 30 000.
    pub handshake_timeout_ms: Option<u32>,
    /// Longest wait for a reply, in milliseconds; default 300 000; 0 waits forever.
    pub request_timeout_ms: Option<u32>,
}

#[napi(object)]
pub struct NativeBlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

#[napi(object)]
pub struct NativeExportInfo {
    pub name: String,
    /// Rounded to the nearest double above 2^53; `size_exact` is exact.
    pub size: i64,
    /// The size in decimal: a JS number cannot hold every u64.
    pub size_exact: String,
    pub flags: u32,
    pub read_only: bool,
    pub can_flush: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    pub can_fast_zero: bool,
    pub can_multi_conn: bool,
    pub block_sizes: NativeBlockSizes,
    pub meta_contexts: Vec<String>,
    pub structured_replies: bool,
    pub extended_headers: bool,
}

#[napi(object)]
pub struct NativeExtent {
    pub offset: i64,
    pub length: i64,
    pub flags: i64,
}

#[napi]
pub struct NativeNbdClient {
    inner: NbdClient,
}

fn connect_options(
    uri: &str,
    options: Option<NativeConnectOptions>,
) -> crate::error::Result<ConnectOptions> {
    let mut opts = ConnectOptions::new(NbdUri::parse(uri)?);
    if let Some(o) = options {
        if let Some(contexts) = o.meta_contexts {
            opts.meta_contexts = contexts;
        }
        if let Some(ext) = o.extended_headers {
            opts.extended_headers = ext;
        }
        if let Some(n) = o.max_in_flight {
            opts.max_in_flight = n.max(1) as usize;
        }
        if let Some(ms) = o.handshake_timeout_ms {
            opts.handshake_timeout = std::time::Duration::from_millis(u64::from(ms));
        }
        if let Some(ms) = o.request_timeout_ms {
            opts.request_timeout =
                Some(std::time::Duration::from_millis(u64::from(ms))).filter(|t| !t.is_zero());
        }
    }
    Ok(opts)
}

/// Connects to an NBD export given by URI (`nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT`).
#[napi]
pub async fn nbd_connect(
    uri: String,
    options: Option<NativeConnectOptions>,
) -> napi::Result<NativeNbdClient> {
    let opts = connect_options(&uri, options).napi()?;
    let inner = NbdClient::connect(&opts).await.napi()?;
    Ok(NativeNbdClient { inner })
}

/// Lists the meta contexts the server has for `queries` (e.g. `qemu:dirty-bitmap:`).
#[napi]
pub async fn nbd_list_meta_contexts(
    uri: String,
    queries: Vec<String>,
) -> napi::Result<Vec<String>> {
    let uri = NbdUri::parse(&uri).napi()?;
    nbd::list_meta_contexts(&uri, &queries).await.napi()
}

#[napi]
impl NativeNbdClient {
    #[napi]
    pub fn info(&self) -> NativeExportInfo {
        let i = self.inner.info();
        NativeExportInfo {
            name: i.name.clone(),
            size: to_js(i.size),
            size_exact: i.size.to_string(),
            flags: u32::from(i.flags),
            read_only: i.read_only(),
            can_flush: i.can_flush(),
            can_trim: i.can_trim(),
            can_write_zeroes: i.can_write_zeroes(),
            can_fast_zero: i.can_fast_zero(),
            can_multi_conn: i.can_multi_conn(),
            block_sizes: NativeBlockSizes {
                minimum: i.block_sizes.minimum,
                preferred: i.block_sizes.preferred,
                maximum: i.block_sizes.maximum,
            },
            meta_contexts: i.meta_contexts.iter().map(|c| c.name.clone()).collect(),
            structured_replies: i.structured_replies,
            extended_headers: i.extended_headers,
        }
    }

    #[napi]
    pub async fn read(&self, offset: i64, length: u32) -> napi::Result<Buffer> {
        let data = self
            .inner
            .read(to_u64(offset, "offset")?, length)
            .await
            .napi()?;
        Ok(Buffer::from(data.to_vec()))
    }

    #[napi]
    pub async fn write(&self, offset: i64, data: Buffer, fua: Option<bool>) -> napi::Result<()> {
        let bytes = bytes::Bytes::copy_from_slice(&data);
        self.inner
            .write(to_u64(offset, "offset")?, bytes, fua.unwrap_or(false))
            .await
            .napi()
    }

    #[napi]
    pub async fn write_zeroes(
        &self,
        offset: i64,
        length: i64,
        may_trim: Option<bool>,
    ) -> napi::Result<()> {
        let (offset, length) = (to_u64(offset, "offset")?, to_u64(length, "length")?);
        self.inner
            .write_zeroes(offset, length, may_trim.unwrap_or(false))
            .await
            .napi()
    }

    #[napi]
    pub async fn trim(&self, offset: i64, length: i64) -> napi::Result<()> {
        self.inner
            .trim(to_u64(offset, "offset")?, to_u64(length, "length")?)
            .await
            .napi()
    }

    #[napi]
    pub async fn flush(&self) -> napi::Result<()> {
        self.inner.flush().await.napi()
    }

    /// Block status of `[offset, offset + length)` for one negotiated context, covering the whole range.
    #[napi]
    pub async fn block_status(
        &self,
        offset: i64,
        length: i64,
        context: String,
    ) -> napi::Result<Vec<NativeExtent>> {
        let (offset, length) = (to_u64(offset, "offset")?, to_u64(length, "length")?);
        let extents = self
            .inner
            .block_status_all(offset, length, &context)
            .await
            .napi()?;
        Ok(extents
            .into_iter()
            .map(|e| NativeExtent {
                offset: to_js(e.offset),
                length: to_js(e.length),
                flags: to_js(e.flags),
            })
            .collect())
    }

    #[napi]
    pub async fn disconnect(&self) -> napi::Result<()> {
        self.inner.disconnect().await.napi()
    }
}
