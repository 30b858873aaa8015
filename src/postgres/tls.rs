//! TLS for the control plane over rustls, following libpq's `sslmode` semantics:
//!
//! | sslmode      | encrypted            | certificate chain checked | host name checked |
//! |--------------|----------------------|---------------------------|-------------------|
//! | disable      | no                   | –                         | –                 |
//! | prefer       | if the server offers | no                        | no                |
//! | require      | yes                  | no                        | no                |
//! | verify-ca    | yes                  | yes                       | no                |
//! | verify-full  | yes                  | yes                       | yes               |
//!
//! As in libpq, `prefer` and `require` protect only against passive eavesdropping.
//! The CA bundle is `sslrootcert` when given, else the Mozilla roots.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::PgError;
use crate::config::{SourceConfig, SslMode};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(mode: SslMode, detail: impl Into<String>) -> PgError {
    PgError::Tls {
        mode: mode.as_str(),
        detail: detail.into(),
    }
}

/// Loads the trust anchors: `sslrootcert` when given, else the Mozilla roots.
fn root_store(source: &SourceConfig) -> Result<RootCertStore, PgError> {
    let mut roots = RootCertStore::empty();
    match &source.sslrootcert {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                tls_err(
                    source.sslmode,
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    tls_err(
                        source.sslmode,
                        format!("{} is not PEM: {e}", path.display()),
                    )
                })?;
                roots.add(cert).map_err(|e| {
                    tls_err(
                        source.sslmode,
                        format!("bad certificate in {}: {e}", path.display()),
                    )
                })?;
                added += 1;
            }
            if added == 0 {
                return Err(tls_err(
                    source.sslmode,
                    format!("{} holds no certificate", path.display()),
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

/// The connector for `sslmode` prefer / require / verify-ca / verify-full.
pub fn make_connector(
    source: &SourceConfig,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PgError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(source.sslmode, e.to_string()))?;
    let config = match source.sslmode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { provider }))
            .with_no_client_auth(),
        SslMode::VerifyCa => {
            let inner = WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(source)?),
                provider,
            )
            .build()
            .map_err(|e| tls_err(source.sslmode, e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { inner }))
                .with_no_client_auth()
        }
        SslMode::VerifyFull => builder
            .with_root_certificates(root_store(source)?)
            .with_no_client_auth(),
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `prefer` / `require`: encrypt, but accept any certificate (libpq's behaviour without a root
/// certificate). Handshake signatures are still verified, so the session key is genuine.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
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

/// `verify-ca`: the chain must lead to a trusted root; the host name is not compared.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
