//! TLS for the HTTP storage services: server certificates are checked by the platform's
//! verifier (the system's trusted roots; on Linux `SSL_CERT_FILE` / `SSL_CERT_DIR` replace
//! them), built at the first TLS handshake rather than at start-up. Loading the system's
//! roots reads every file under /etc/ssl/certs (~30 ms on a cold disk cache): a command on
//! a local, SFTP or plain-http box never pays for it. A connection refused by TLS fails at once:
//! opendal counts every failed connection as temporary, and a refused certificate was tried
//! again for minutes before its error showed.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Words in an error's chain that mean TLS failed for a reason that trying again does not
/// change: the server's certificate was refused, no trusted roots could be loaded, or the
/// server does not speak TLS (or not a version or cipher in common) at that port.
pub(crate) const FINAL_ERRORS: &[&str] = &[
    "invalid peer certificate",
    "trusted certificates could not be loaded",
    "peer is incompatible",
    "received corrupt message",
];

/// The reqwest transport of the HTTP services, with TLS failures (see [`FINAL_ERRORS`])
/// marked permanent so that no retry layer waits on them.
pub(crate) struct Transport(pub(crate) opendal_http_transport_reqwest::ReqwestTransport);

impl opendal::HttpTransport for Transport {
    async fn fetch(&self, req: http::Request<opendal::Buffer>) -> opendal::Result<http::Response<opendal::HttpBody>> {
        self.0.fetch(req).await.map_err(|e| if refused(&e) { e.set_permanent() } else { e })
    }
}

/// Whether `e` (or an error under it) is a TLS failure of [`FINAL_ERRORS`].
fn refused(e: &opendal::Error) -> bool {
    let text = crate::backend::chain_text(e);
    FINAL_ERRORS.iter().any(|w| text.contains(w))
}

/// A reqwest client builder with [`client_config`] (reqwest's own TLS settings, which load
/// the trusted certificates at once, if there are none).
pub(crate) fn client_builder() -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder();
    match client_config() {
        Some(tls) => builder.tls_backend_preconfigured(tls),
        None => builder,
    }
}

/// The client TLS settings for every HTTP client: TLS 1.2 and 1.3 with rustls' ring provider,
/// HTTP/1.1, and the platform's certificate checks (made when first needed). `None` only if
/// the provider had no protocol version to offer (then reqwest's own settings serve).
pub(crate) fn client_config() -> Option<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PlatformVerifier { provider: provider.clone(), inner: OnceLock::new() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Some(config)
}

/// `rustls_platform_verifier::Verifier`, made at its first use; every check goes to it. If
/// it cannot be made (no trusted roots at all), the certificate is refused with that reason,
/// and the next handshake tries again.
#[derive(Debug)]
struct PlatformVerifier {
    provider: Arc<CryptoProvider>,
    inner: OnceLock<rustls_platform_verifier::Verifier>,
}

impl PlatformVerifier {
    fn get(&self) -> Result<&rustls_platform_verifier::Verifier, rustls::Error> {
        if let Some(v) = self.inner.get() {
            return Ok(v);
        }
        let made = rustls_platform_verifier::Verifier::new(self.provider.clone()).map_err(|e| {
            rustls::Error::General(format!("the system's trusted certificates could not be loaded: {e}"))
        })?;
        // Two first handshakes at once may both make one; either serves.
        Ok(self.inner.get_or_init(|| made))
    }
}

impl ServerCertVerifier for PlatformVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.get()?.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls13_signature(message, cert, dss)
    }

    /// The provider's schemes, as the platform verifier's are (asked before any certificate
    /// is seen, so without loading the roots).
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    /// reqwest takes these settings as its own: built with another rustls than reqwest's,
    /// they would be an unknown TLS backend and the client would not build.
    #[test]
    fn reqwest_takes_the_settings() {
        assert!(super::client_config().is_some());
        assert!(super::client_builder().build().is_ok());
    }
}
