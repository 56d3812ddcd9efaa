//! [`Objects`] on S3-compatible object storage, through the `object_store` crate (AWS Signature
//! V4, rustls, path-style addressing by default for self-hosted stores).
//!
//! The client retries connection errors, 5xx and throttling answers with exponential backoff
//! (object_store's `RetryConfig`, bounded by [`RetryOptions::timeout`]); what is left is turned
//! into the store's typed errors here, each naming the endpoint, the bucket and the key.
//! object_store does not expose an error's HTTP status or S3 error code as values, so they are
//! read from its error chain's text (`status code: 403 …`, `<Code>…</Code>`): pinned to the
//! crate's 0.14 series and checked against a real Garage cluster by `test/chunk-store-s3.test.ts`.
//!
//! TLS trusts the system's roots plus a CA file, or, with a pinned fingerprint, exactly one
//! certificate (`pin.rs`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::HttpError;
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{BackoffConfig, Certificate, ClientOptions, ObjectStoreExt, RetryConfig};

use super::pin::{Fingerprint, PinMismatch, PinnedConnector};
use super::{ObjectMeta, Objects, LIST_PAGE};
use crate::error::{Error, Result};

/// How long and how often a failing request is retried.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RetryOptions {
    /// No retry starts after this long since the first attempt. The error then arrives at most
    /// one backoff ([`RetryOptions::max_backoff`]) and one request later.
    pub timeout: Duration,
    /// Retries of one request at most: a backstop, the timeout is the bound that matters (a
    /// refused connection fails at once, so a few retries would pass in a second or two).
    pub max_retries: usize,
    /// First backoff; each next one is drawn up to twice the previous (with jitter).
    pub init_backoff: Duration,
    /// Longest single backoff.
    pub max_backoff: Duration,
}

impl Default for RetryOptions {
    fn default() -> Self {
        RetryOptions {
            timeout: Duration::from_secs(60),
            max_retries: 100,
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Where the store is and how to reach it. `Debug` leaves the secrets out.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct S3Options {
    /// `https://host[:port]` (or `http://` with [`S3Options::allow_http`]); `None`: AWS S3 of
    /// [`S3Options::region`].
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Keys of the store live under `prefix/` (no leading or trailing slash needed; may be empty).
    pub prefix: String,
    /// `bucket.host` addressing; off by default (path style, what self-hosted stores serve).
    pub virtual_hosted: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// PEM file of the certificate authorities to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Trust exactly the server certificate with this SHA-256 (`AB:CD:…`, PVE's `fingerprint`),
    /// and nothing else: neither the system's roots nor a CA file (the two options exclude
    /// each other).
    pub fingerprint: Option<String>,
    /// Plain HTTP: required for an `http://` endpoint, never used for an `https://` one.
    pub allow_http: bool,
    pub retry: RetryOptions,
    /// Longest one request may take (connect to last byte).
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("virtual_hosted", &self.virtual_hosted)
            .field("access_key_id", &self.access_key_id)
            .field("ca_file", &self.ca_file)
            .field("fingerprint", &self.fingerprint)
            .field("allow_http", &self.allow_http)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: "us-east-1".into(),
            bucket: String::new(),
            prefix: String::new(),
            virtual_hosted: false,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            session_token: None,
            ca_file: None,
            fingerprint: None,
            allow_http: false,
            retry: RetryOptions::default(),
            request_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// An S3 bucket (under a prefix) as [`Objects`].
#[derive(Debug)]
pub struct S3Objects {
    store: AmazonS3,
    /// `endpoint bucket` for messages.
    place: String,
    /// Normalised: no leading or trailing slash.
    prefix: String,
    /// Some request succeeded, so the bucket exists: a 404 is then a missing object.
    bucket_seen: AtomicBool,
    access_key_id: String,
}

/// What an S3 answer said, read from object_store's error.
#[derive(Debug, Default)]
struct Answer {
    status: Option<u16>,
    /// `<Code>` of the S3 error body.
    code: Option<String>,
    /// `<Message>` of the S3 error body.
    message: Option<String>,
    /// The request never got an answer (connect, timeout, dropped connection).
    transport: bool,
    /// The TLS handshake refused the server's certificate.
    certificate: bool,
    /// The server's certificate is not the pinned one.
    mismatch: Option<PinMismatch>,
}

impl S3Objects {
    /// A client for `options`; nothing is sent until the first request.
    pub fn new(options: &S3Options) -> Result<Self> {
        if options.bucket.is_empty() {
            return Err(Error::invalid_argument("an S3 store needs a bucket"));
        }
        if options.access_key_id.is_empty() || options.secret_access_key.is_empty() {
            return Err(Error::invalid_argument(format!(
                "S3 bucket {}: an access key id and a secret key are needed",
                options.bucket
            )));
        }
        let mut client = ClientOptions::new()
            .with_timeout(options.request_timeout)
            .with_connect_timeout(options.connect_timeout);
        let mut builder = AmazonS3Builder::new()
            .with_region(&options.region)
            .with_bucket_name(&options.bucket)
            .with_access_key_id(&options.access_key_id)
            .with_secret_access_key(&options.secret_access_key)
            .with_virtual_hosted_style_request(options.virtual_hosted)
            // one DELETE per key: every S3 implementation has it (not all have DeleteObjects)
            .with_disable_bulk_delete(true)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: options.retry.init_backoff,
                    max_backoff: options.retry.max_backoff.max(options.retry.init_backoff),
                    base: 2.0,
                },
                max_retries: options.retry.max_retries,
                retry_timeout: options.retry.timeout,
            });
        if let Some(token) = &options.session_token {
            builder = builder.with_token(token);
        }
        let endpoint = match &options.endpoint {
            Some(endpoint) => {
                let endpoint = endpoint.trim_end_matches('/');
                if endpoint.starts_with("http://") {
                    if options.fingerprint.is_some() {
                        return Err(Error::invalid_argument(format!(
                            "S3 endpoint {endpoint} is plain http: a certificate fingerprint needs https"
                        )));
                    }
                    if !options.allow_http {
                        return Err(Error::invalid_argument(format!(
                            "S3 endpoint {endpoint} is plain http: allow it explicitly (allowHttp) or use https"
                        )));
                    }
                    client = client.with_allow_http(true);
                } else if !endpoint.starts_with("https://") {
                    return Err(Error::invalid_argument(format!(
                        "S3 endpoint {endpoint:?} must start with https:// or http://"
                    )));
                }
                builder = builder.with_endpoint(endpoint);
                endpoint.to_string()
            }
            None => format!("https://s3.{}.amazonaws.com", options.region),
        };
        if endpoint.starts_with("https://") {
            // The request is signed, its body not: TLS protects the body in transit, and every
            // chunk carries its own digest, checked on every read. A signed body costs a second
            // SHA-256 of each chunk (the client's largest CPU cost in `npm run bench:chunks`).
            builder = builder.with_unsigned_payload(true);
        }
        if let Some(fingerprint) = &options.fingerprint {
            let pin: Fingerprint = fingerprint.parse()?;
            if options.ca_file.is_some() {
                return Err(Error::invalid_argument(format!(
                    "S3 endpoint {endpoint}: give a CA file or a certificate fingerprint, not both (a fingerprint trusts exactly one certificate)"
                )));
            }
            builder = builder.with_http_connector(PinnedConnector {
                pin,
                request_timeout: options.request_timeout,
                connect_timeout: options.connect_timeout,
            });
        }
        if let Some(file) = &options.ca_file {
            let pem = std::fs::read(file).map_err(|e| {
                Error::invalid_argument(format!("reading CA file {}", file.display())).caused_by(e)
            })?;
            let certs = Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::invalid_argument(format!("CA file {} is not PEM", file.display()))
                    .caused_by(e)
            })?;
            if certs.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "CA file {} holds no certificate",
                    file.display()
                )));
            }
            for cert in certs {
                client = client.with_root_certificate(cert);
            }
        }
        let place = format!("{endpoint} bucket {}", options.bucket);
        let store = builder.with_client_options(client).build().map_err(|e| {
            Error::invalid_argument(format!("S3 store at {place}: bad options")).caused_by(e)
        })?;
        Ok(S3Objects {
            store,
            place,
            prefix: options.prefix.trim_matches('/').to_string(),
            bucket_seen: AtomicBool::new(false),
            access_key_id: options.access_key_id.clone(),
        })
    }

    fn path(&self, key: &str) -> Result<Path> {
        let full = self.full_key(key);
        Path::parse(&full).map_err(|e| {
            Error::invalid_argument(format!("invalid object key {full:?} at {}", self.place))
                .caused_by(e)
        })
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{}", self.prefix, key)
        }
    }

    fn seen(&self) {
        self.bucket_seen.store(true, Ordering::Relaxed);
    }

    /// The typed error for `err`, from `op` (put, get, …) on `key`.
    fn error(&self, op: &str, key: &str, err: object_store::Error) -> Error {
        let answer = read_answer(&err);
        let what = format!("S3 {op} of {} at {}", self.full_key(key), self.place);
        let said = match (&answer.code, &answer.message) {
            (Some(c), Some(m)) => format!(" ({c}: {m})"),
            (Some(c), None) => format!(" ({c})"),
            _ => String::new(),
        };
        let code = answer.code.as_deref().unwrap_or("");
        let mentions_quota = code.contains("Quota")
            || answer
                .message
                .as_deref()
                .is_some_and(|m| m.to_ascii_lowercase().contains("quota"));
        // Garage answers AccessDenied "No such key: <key id>" and "Invalid signature" where AWS
        // answers InvalidAccessKeyId and SignatureDoesNotMatch
        let unknown_key_id = code == "InvalidAccessKeyId"
            || answer.message.as_deref().is_some_and(|m| {
                m.to_ascii_lowercase().contains("no such key") && m.contains(&self.access_key_id)
            });
        let bad_signature = code == "SignatureDoesNotMatch"
            || answer
                .message
                .as_deref()
                .is_some_and(|m| m.to_ascii_lowercase().contains("invalid signature"));
        if answer.mismatch.is_some() {
            // the cause says which fingerprint the server presented and which was pinned
            return Error::store_certificate(format!(
                "{what}: TLS: not the pinned certificate, nothing was sent (if the server's certificate was replaced, check it and pin the new fingerprint)"
            ))
            .caused_by(err);
        }
        if answer.transport && answer.certificate {
            return Error::store_certificate(format!(
                "{what}: TLS: the endpoint's certificate is not trusted (give the CA that signed it as a CA file, or pin its fingerprint)"
            ))
            .caused_by(err);
        }
        if answer.transport {
            return Error::store_unavailable(format!("{what}: no answer after retries"))
                .caused_by(err);
        }
        if matches!(err, object_store::Error::InvalidPath { .. }) {
            return Error::invalid_argument(format!("{what}: invalid key")).caused_by(err);
        }
        match answer.status {
            Some(507) => {
                Error::store_full(format!("{what}: the store is out of space{said}")).caused_by(err)
            }
            Some(403 | 400 | 413) if mentions_quota => {
                Error::store_full(format!("{what}: the bucket quota is exceeded{said}"))
                    .caused_by(err)
            }
            Some(403 | 400) if unknown_key_id => Error::store_access(format!(
                "{what}: the access key id is not known to the store{said}"
            ))
            .caused_by(err),
            Some(403 | 400) if bad_signature => Error::store_access(format!(
                "{what}: the signature was refused: wrong secret key for this access key id{said}"
            ))
            .caused_by(err),
            Some(401 | 403) => {
                Error::store_access(format!("{what}: access denied{said}")).caused_by(err)
            }
            Some(404) if code != "NoSuchKey" => {
                Error::store_not_found(format!("{what}: no such bucket{said}")).caused_by(err)
            }
            Some(s) if s >= 500 || s == 429 || s == 408 => Error::store_unavailable(format!(
                "{what}: the store kept failing (HTTP {s}) after retries{said}"
            ))
            .caused_by(err),
            Some(s) => {
                Error::store_access(format!("{what}: refused with HTTP {s}{said}")).caused_by(err)
            }
            None => Error::store_unavailable(format!("{what}: failed")).caused_by(err),
        }
    }

    /// A 404 on an object: a missing object if the bucket exists, else `ERR_STORE_NOT_FOUND`.
    async fn missing(&self, op: &str, key: &str, err: object_store::Error) -> Result<()> {
        if self.bucket_seen.load(Ordering::Relaxed) {
            return Ok(());
        }
        let code = read_answer(&err).code;
        if code.as_deref() == Some("NoSuchBucket") {
            return Err(self.error(op, key, err));
        }
        // a HEAD answer has no body: ask the bucket itself
        let probe = PaginatedListOptions {
            max_keys: Some(1),
            ..PaginatedListOptions::default()
        };
        let prefix = (!self.prefix.is_empty()).then(|| format!("{}/", self.prefix));
        match self.store.list_paginated(prefix.as_deref(), probe).await {
            Ok(_) => {
                self.seen();
                Ok(())
            }
            Err(e) => Err(self.error(op, key, e)),
        }
    }
}

/// Reads status, S3 code and message, and whether there was an answer at all, from the chain.
fn read_answer(err: &object_store::Error) -> Answer {
    let mut answer = Answer::default();
    let mut text = String::new();
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if e.downcast_ref::<HttpError>().is_some() {
            answer.transport = true;
        }
        if answer.mismatch.is_none() {
            answer.mismatch = PinMismatch::find(e).cloned();
        }
        text.push_str(&e.to_string());
        text.push('\n');
        current = e.source();
    }
    match err {
        object_store::Error::NotFound { .. } => answer.status = Some(404),
        object_store::Error::PermissionDenied { .. } => answer.status = Some(403),
        object_store::Error::Unauthenticated { .. } => answer.status = Some(401),
        _ => {}
    }
    if let Some(at) = text.find("status code: ") {
        let digits: String = text[at + 13..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(status) = digits.parse() {
            answer.status = Some(status);
            // an HTTP answer: a transport error further down the chain is a body read's
            answer.transport = false;
        }
    }
    let lower = text.to_ascii_lowercase();
    answer.certificate =
        lower.contains("invalid peer certificate") || lower.contains("unknownissuer");
    answer.code = between(&text, "<Code>", "</Code>");
    answer.message = between(&text, "<Message>", "</Message>");
    answer
}

fn between(text: &str, open: &str, close: &str) -> Option<String> {
    let start = text.find(open)? + open.len();
    let len = text[start..].find(close)?;
    Some(text[start..start + len].trim().to_string()).filter(|s| !s.is_empty())
}

fn to_meta(prefix: &str, meta: object_store::ObjectMeta) -> ObjectMeta {
    let full = meta.location.as_ref();
    let key = if prefix.is_empty() {
        full.to_string()
    } else {
        full.strip_prefix(prefix)
            .and_then(|k| k.strip_prefix('/'))
            .unwrap_or(full)
            .to_string()
    };
    ObjectMeta {
        key,
        size: meta.size,
        modified: meta.last_modified.timestamp(),
    }
}

impl S3Objects {
    /// The objects under `prefix` (a plain string prefix, no trailing delimiter added), page by
    /// page, stopping after `max_keys` when given; `true` when that was every one.
    async fn list_pages(
        &self,
        prefix: &str,
        max_keys: Option<usize>,
    ) -> Result<(Vec<ObjectMeta>, bool)> {
        let full = self.full_key(prefix);
        let mut out = Vec::new();
        let mut page_token = None;
        loop {
            let left = max_keys.map(|m| m.saturating_sub(out.len()));
            if left == Some(0) {
                return Ok((out, false));
            }
            let options = PaginatedListOptions {
                page_token: page_token.take(),
                max_keys: left.map(|l| l.min(LIST_PAGE)),
                ..PaginatedListOptions::default()
            };
            let page = self
                .store
                .list_paginated((!full.is_empty()).then_some(full.as_str()), options)
                .await
                .map_err(|e| self.error("list", prefix, e))?;
            self.seen();
            out.extend(
                page.result
                    .objects
                    .into_iter()
                    .map(|m| to_meta(&self.prefix, m)),
            );
            match page.page_token {
                Some(token) => page_token = Some(token),
                None => return Ok((out, true)),
            }
        }
    }
}

#[async_trait]
impl Objects for S3Objects {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        match self.store.put(&path, data.into()).await {
            Ok(_) => {
                self.seen();
                Ok(())
            }
            Err(e) => Err(self.error("put", key, e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path(key)?;
        let result = match self.store.get(&path).await {
            Ok(r) => r,
            Err(e @ object_store::Error::NotFound { .. }) => {
                self.missing("get", key, e).await?;
                return Ok(None);
            }
            Err(e) => return Err(self.error("get", key, e)),
        };
        match result.bytes().await {
            Ok(b) => {
                self.seen();
                Ok(Some(b))
            }
            Err(e) => Err(self.error("get", key, e)),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key)?;
        match self.store.head(&path).await {
            Ok(meta) => {
                self.seen();
                Ok(Some(to_meta(&self.prefix, meta)))
            }
            Err(e @ object_store::Error::NotFound { .. }) => {
                self.missing("head", key, e).await?;
                Ok(None)
            }
            Err(e) => Err(self.error("head", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Ok(self.list_pages(prefix, None).await?.0)
    }

    async fn list_limited(&self, prefix: &str, max_keys: usize) -> Result<(Vec<ObjectMeta>, bool)> {
        self.list_pages(prefix, Some(max_keys)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match self.store.delete(&path).await {
            Ok(()) => {
                self.seen();
                Ok(())
            }
            // S3 answers a DELETE of a missing key with 204: a 404 is the bucket
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    async fn copy(&self, from: &str, to: &str) -> Result<bool> {
        let (source, target) = (self.path(from)?, self.path(to)?);
        match self.store.copy(&source, &target).await {
            Ok(()) => {
                self.seen();
                Ok(true)
            }
            Err(e @ object_store::Error::NotFound { .. }) => {
                self.missing("copy", from, e).await?;
                Ok(false)
            }
            Err(e) => Err(self.error("copy", from, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> S3Options {
        S3Options {
            endpoint: Some("http://127.0.0.1:1".into()),
            bucket: "b".into(),
            prefix: "/p/q/".into(),
            access_key_id: "id".into(),
            secret_access_key: "secret".into(),
            allow_http: true,
            ..S3Options::default()
        }
    }

    #[test]
    fn plain_http_needs_to_be_allowed() {
        let e = S3Objects::new(&S3Options {
            allow_http: false,
            ..options()
        })
        .unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        assert!(e.to_string().contains("plain http"), "{e}");
        assert!(S3Objects::new(&options()).is_ok());
        let e = S3Objects::new(&S3Options {
            endpoint: Some("ftp://x".into()),
            ..options()
        })
        .unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    }

    #[test]
    fn prefix_is_normalised() {
        let s = S3Objects::new(&options()).unwrap();
        assert_eq!(s.full_key("chunks/ab"), "p/q/chunks/ab");
        assert_eq!(s.path("a//b").unwrap_err().code(), "ERR_INVALID_ARGUMENT");
        // no key escapes the prefix
        assert_eq!(s.path("../x").unwrap_err().code(), "ERR_INVALID_ARGUMENT");
        assert_eq!(s.path("a/./x").unwrap_err().code(), "ERR_INVALID_ARGUMENT");
    }

    #[test]
    fn bad_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, "not a certificate").unwrap();
        let e = S3Objects::new(&S3Options {
            ca_file: Some(file.clone()),
            ..options()
        })
        .unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        assert!(e.to_string().contains(&*file.to_string_lossy()), "{e}");
    }

    #[test]
    fn a_fingerprint_needs_https_the_pve_format_and_no_ca_file() {
        let fp = "EE:75:2E:C5:65:CA:B3:80:54:F4:5A:A2:E7:E2:64:7D:34:61:D0:8D:EF:A8:47:15:CE:EB:9E:2C:D5:44:34:78";
        let pinned = S3Options {
            endpoint: Some("https://127.0.0.1:1".into()),
            allow_http: false,
            fingerprint: Some(fp.into()),
            ..options()
        };
        assert!(S3Objects::new(&pinned).is_ok());
        let e = S3Objects::new(&S3Options {
            fingerprint: Some(fp.into()),
            ..options()
        })
        .unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        assert!(e.to_string().contains("needs https"), "{e}");
        let e = S3Objects::new(&S3Options {
            fingerprint: Some(fp[3..].into()),
            ..pinned.clone()
        })
        .unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        assert!(e.to_string().contains(&fp[3..]), "{e}");
        let e = S3Objects::new(&S3Options {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..pinned
        })
        .unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        assert!(e.to_string().contains("not both"), "{e}");
    }

    #[test]
    fn reads_code_and_message() {
        let text = "x status code: 403 Forbidden: <Error><Code>AccessDenied</Code><Message>Quota exceeded</Message></Error>";
        assert_eq!(
            between(text, "<Code>", "</Code>").as_deref(),
            Some("AccessDenied")
        );
        assert_eq!(
            between(text, "<Message>", "</Message>").as_deref(),
            Some("Quota exceeded")
        );
        assert_eq!(between("none", "<Code>", "</Code>"), None);
    }

    #[tokio::test]
    async fn connection_refused_is_unavailable_within_the_retry_time() {
        // port 1 on loopback: nobody listens
        let s = S3Objects::new(&S3Options {
            retry: RetryOptions {
                timeout: Duration::from_millis(300),
                max_retries: 100,
                init_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
            },
            ..options()
        })
        .unwrap();
        let t0 = std::time::Instant::now();
        let e = s.put("k", Bytes::from_static(b"x")).await.unwrap_err();
        assert_eq!(e.code(), "ERR_STORE_UNAVAILABLE", "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        let msg = e.to_string();
        assert!(msg.contains("http://127.0.0.1:1 bucket b"), "{msg}");
        assert!(msg.contains("p/q/k"), "{msg}");
    }
}
