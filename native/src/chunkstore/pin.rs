//! Pinning the S3 endpoint's TLS certificate by its SHA-256 fingerprint, as Proxmox VE's storage
//! plugins pin a Proxmox Backup Server (pve-storage `src/PVE/Storage/PBSPlugin.pm`, option
//! `fingerprint`; format `fingerprint-sha256` of pve-common `src/PVE/JSONSchema.pm`: the pattern
//! `([A-Fa-f0-9]{2}:){31}[A-Fa-f0-9]{2}`; read at pve-storage 0c56bad, pve-common f665029).
//!
//! With a pin, the certificate the server presents (the leaf) is accepted if and only if its
//! SHA-256 is the pinned one, whatever its names, issuer or dates: a self-signed certificate
//! works, and a certificate a public CA signed does not unless it is the pinned one. That is what
//! PBSPlugin's API connection does with the fingerprint (`cached_fingerprints`: pve-apiclient
//! `src/PVE/APIClient/LWP.pm` then turns hostname verification off and "purely trust[s] the
//! configured fingerprints", checking only the leaf). Only chain and name checks are replaced:
//! the handshake's signatures are still verified with the crypto provider's algorithms, so the
//! server must hold the pinned certificate's private key.
//!
//! A mismatch is not retried (it is not transient): [`PinnedConnector`] hands object_store a
//! client whose TLS errors for a mismatch are final, carrying [`PinMismatch`] with the
//! fingerprint the server presented, which `s3.rs` turns into `ERR_STORE_CERTIFICATE`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpService,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// SHA-256 of a DER certificate; parsed from and shown as `AB:CD:…` (upper case, as PVE stores
/// it and `openssl x509 -fingerprint -sha256` prints it).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl FromStr for Fingerprint {
    type Err = Error;

    /// Exactly 32 two-digit hex bytes separated by `:` (pve-common's `fingerprint-sha256`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid_argument(format!(
                "fingerprint {s:?} is not a SHA-256 fingerprint (32 hex bytes separated by colons, AB:CD:…)"
            ))
        };
        let mut out = [0u8; 32];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// The server presented a certificate other than the pinned one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinMismatch {
    pub presented: Fingerprint,
    pub pinned: Fingerprint,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server's certificate has SHA-256 fingerprint {}, not the pinned {}",
            self.presented, self.pinned
        )
    }
}

impl std::error::Error for PinMismatch {}

impl PinMismatch {
    /// The mismatch somewhere in `err`'s source chain (a TLS error inside I/O and HTTP errors).
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a PinMismatch> {
        let mut current = Some(err);
        while let Some(e) = current {
            if let Some(m) = e.downcast_ref::<PinMismatch>() {
                return Some(m);
            }
            // rustls' error has no `source()`: look inside its `Other` certificate error
            if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
                e.downcast_ref::<rustls::Error>()
            {
                if let Some(m) = other.0.downcast_ref::<PinMismatch>() {
                    return Some(m);
                }
            }
            // an I/O error's `source()` skips the error it wraps: look at that one too
            if let Some(inner) = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                if let Some(m) = PinMismatch::find(inner) {
                    return Some(m);
                }
            }
            current = e.source();
        }
        None
    }
}

/// Accepts exactly the certificate with the pinned fingerprint; verifies handshake signatures
/// with `provider`'s algorithms.
#[derive(Debug)]
pub struct PinnedVerifier {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    pub fn new(pin: Fingerprint, provider: Arc<CryptoProvider>) -> Self {
        PinnedVerifier { pin, provider }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of(end_entity);
        if presented == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    presented,
                    pinned: self.pin,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls client configuration that trusts only the pinned certificate: the crypto provider
/// reqwest would use here (aws-lc-rs), its safe protocol versions, ALPN as reqwest offers it.
pub fn pinned_tls_config(pin: Fingerprint) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            Error::invalid_argument("TLS configuration for a pinned certificate").caused_by(e)
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(pin, provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// object_store's HTTP client for a pinned endpoint: reqwest with [`pinned_tls_config`], https
/// only, the same timeouts and no compression as object_store's own client for the options
/// `S3Objects` sets (object_store builds its reqwest client privately, so those are repeated;
/// its shuffling of DNS answers is not, its resolver being private: connections go to the
/// addresses in the system resolver's order).
#[derive(Debug)]
pub struct PinnedConnector {
    pub pin: Fingerprint,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl HttpConnector for PinnedConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let generic =
            |source: Box<dyn std::error::Error + Send + Sync>| object_store::Error::Generic {
                store: "S3",
                source,
            };
        let tls = pinned_tls_config(self.pin).map_err(|e| generic(Box::new(e)))?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("pve-backup-provider/", env!("CARGO_PKG_VERSION")))
            .https_only(true)
            .timeout(self.request_timeout)
            .connect_timeout(self.connect_timeout)
            // compression would break Content-Length, which object_store reads as the size
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| generic(Box::new(e)))?;
        Ok(HttpClient::new(PinnedClient(client)))
    }
}

/// reqwest's client as object_store uses it, except that a pin mismatch is a final error (kind
/// `Unknown`: object_store retries connect errors, and a wrong certificate does not go away).
#[derive(Debug)]
struct PinnedClient(reqwest::Client);

#[async_trait]
impl HttpService for PinnedClient {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        self.0
            .call(req)
            .await
            .map_err(|e| match PinMismatch::find(&e) {
                Some(m) => HttpError::new(HttpErrorKind::Unknown, m.clone()),
                None => e,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str =
        "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

    #[test]
    fn parses_and_shows_the_pve_format() {
        let fp: Fingerprint = FP.parse().unwrap();
        assert_eq!(fp.to_string(), FP);
        // either case, shown upper case
        assert_eq!(FP.to_lowercase().parse::<Fingerprint>().unwrap(), fp);
        for bad in [
            "",
            &FP[3..],
            &format!("{FP}:00"),
            &FP.replace(':', ""),
            &FP.replace("AB:", "AB-"),
            &FP.replacen("AB", "GB", 1),
            &FP.replacen("AB", "+A", 1),
            &FP.replacen("AB:", "A:B", 1),
        ] {
            let e = bad.parse::<Fingerprint>().unwrap_err();
            assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{bad}");
            assert!(e.to_string().contains("SHA-256 fingerprint"), "{e}");
        }
    }

    #[test]
    fn fingerprint_is_sha256_of_the_der() {
        // SHA-256 of "abc" (FIPS 180-2 example)
        assert_eq!(
            Fingerprint::of(b"abc").to_string(),
            "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
        );
    }

    fn verifier(pin: Fingerprint) -> PinnedVerifier {
        PinnedVerifier::new(pin, Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
    }

    #[test]
    fn accepts_exactly_the_pinned_leaf() {
        let leaf = CertificateDer::from(b"leaf certificate".to_vec());
        let other = CertificateDer::from(b"another certificate".to_vec());
        let name = ServerName::try_from("s3.example").unwrap();
        let v = verifier(Fingerprint::of(&leaf));
        // names, intermediates and time play no part
        assert!(v
            .verify_server_cert(
                &leaf,
                std::slice::from_ref(&other),
                &name,
                &[],
                UnixTime::now()
            )
            .is_ok());
        let e = v
            .verify_server_cert(
                &other,
                std::slice::from_ref(&leaf),
                &name,
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        let m = PinMismatch::find(&e).expect("a pin mismatch").clone();
        assert_eq!(m.presented, Fingerprint::of(&other));
        assert_eq!(m.pinned, Fingerprint::of(&leaf));
        assert!(m.to_string().contains(&Fingerprint::of(&other).to_string()));
        // found through I/O wrappers, as hyper passes it on
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(PinMismatch::find(&io), Some(&m));
    }

    // a self-signed P-256 certificate (CN=pinned), its key, and a key of another certificate
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBeTCCAR+gAwIBAgIULUaN60x1gmd73RF5bPe1OZ/q7TcwCgYIKoZIzj0EAwIw
ETEPMA0GA1UEAwwGcGlubmVkMCAXDTI2MTIwMTExMDkxMloYDzIxMjYxMTA3MTEw
OTEyWjARMQ8wDQYDVQQDDAZwaW5uZWQwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AATLpsQBxxImBffOEz6NTp+4PReNsHxu7PlWDpeTfEKElj9n5SAkYx1tRA3jihga
qy1CSAx2px8ez7ZStQHGD2Kbo1MwUTAdBgNVHQ4EFgQUSpG8F4XQRh9Q9fqbzVlb
AeBKOaQwHwYDVR0jBBgwFoAUSpG8F4XQRh9Q9fqbzVlbAeBKOaQwDwYDVR0TAQH/
BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiEAze1cU/JItfGKRH6MdmxxdKbfNIRO
hXccWs6ttzaIHi8CICnqCTrHmL9k1mauOne26e+OlBJZFZO5zx15ZjVe0PFw
-----END CERTIFICATE-----
";
    /// `openssl x509 -in cert.pem -noout -fingerprint -sha256` of [`CERT`].
    const CERT_FP: &str =
        "EE:75:2E:C5:65:CA:B3:80:54:F4:5A:A2:E7:E2:64:7D:34:61:D0:8D:EF:A8:47:15:CE:EB:9E:2C:D5:44:34:78";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgx2dEY7W7+CMom7L+
2YNP4pRRfIof0PIsXpOSqMI1cSOhRANCAATLpsQBxxImBffOEz6NTp+4PReNsHxu
7PlWDpeTfEKElj9n5SAkYx1tRA3jihgaqy1CSAx2px8ez7ZStQHGD2Kb
-----END PRIVATE KEY-----
";
    const OTHER_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgP7+As9F08MMYadh0
7sVslKog4WAOulMTZVoFlFyQy9ehRANCAAS7idxRrPZNPOIFopWO1VCitQpUQlQ0
oQhgo0TV8w53AYfoi72Jt4vmxDIErtFNzwflmBTboK3K82lQiQAnp1Di
-----END PRIVATE KEY-----
";

    /// Serves one certificate with one key, matching or not (rustls' own config builders
    /// refuse a key that does not match its certificate).
    #[derive(Debug)]
    struct Serve(Arc<rustls::sign::CertifiedKey>);

    impl rustls::server::ResolvesServerCert for Serve {
        fn resolve(
            &self,
            _hello: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    /// A TLS handshake in memory between a client trusting `pin` only and a server presenting
    /// [`CERT`] signed with `key`, in `version`.
    fn handshake(
        pin: &str,
        key: &str,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Result<(), rustls::Error> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cert = CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let signing = provider.key_provider.load_private_key(key).unwrap();
        let served = rustls::sign::CertifiedKey::new(vec![cert], signing);
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Serve(Arc::new(served))));
        let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        let mut tls = pinned_tls_config(pin.parse().unwrap()).unwrap();
        tls.alpn_protocols.clear();
        // the name is not the certificate's: a pin does not look at names
        let name = ServerName::try_from("s3.example").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(tls), name).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets()?;
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn handshakes_with_the_pinned_self_signed_certificate() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            handshake(CERT_FP, KEY, version).unwrap();
            handshake(&CERT_FP.to_lowercase(), KEY, version).unwrap();
        }
    }

    #[test]
    fn refuses_another_certificate_naming_the_presented_fingerprint() {
        let e = handshake(FP, KEY, &rustls::version::TLS13).unwrap_err();
        let m = PinMismatch::find(&e).expect("a pin mismatch");
        assert_eq!(m.presented.to_string(), CERT_FP);
        assert_eq!(m.pinned.to_string(), FP);
    }

    #[test]
    fn handshake_signatures_are_still_checked() {
        // the pinned certificate, presented by a server without its private key
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let e = handshake(CERT_FP, OTHER_KEY, version).unwrap_err();
            assert!(PinMismatch::find(&e).is_none(), "{e}");
            assert!(
                matches!(
                    e,
                    rustls::Error::InvalidCertificate(CertificateError::BadSignature)
                ),
                "{e:?}"
            );
        }
    }

    #[test]
    fn builds_a_pinned_client() {
        let connector = PinnedConnector {
            pin: FP.parse().unwrap(),
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
        };
        assert!(connector.connect(&ClientOptions::new()).is_ok());
    }
}
