//! TLS over rustls for both planes, following libpq's `sslmode` semantics:
//!
//! | sslmode      | encrypted            | certificate chain checked | host name checked |
//! |--------------|----------------------|---------------------------|-------------------|
//! | disable      | no                   | –                         | –                 |
//! | prefer       | if the server offers | no                        | no                |
//! | require      | yes                  | only with `sslrootcert`   | no                |
//! | verify-ca    | yes                  | yes                       | no                |
//! | verify-full  | yes                  | yes                       | yes               |
//!
//! As in libpq, `prefer` and `require` protect only against passive eavesdropping, and
//! `require` with `sslrootcert` set checks the chain as `verify-ca` does. The host name check
//! of `verify-full` compares a DNS name in `host` with the certificate's DNS names and an IP
//! address in `host` with its IP addresses (subject alternative names; rustls does not fall
//! back to the common name). The CA bundle is `sslrootcert` when given, else the Mozilla roots.
//!
//! The control plane uses [`make_connector`]; the replication plane probes the server with
//! [`client_config`] before its session (see `source::tls`). A handshake that fails for a
//! reason retrying cannot fix (the server offers no TLS, an untrusted or expired certificate,
//! another name) is a [`PgError::Tls`], which is fatal; a network failure during the handshake
//! is not.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{PgError, target};
use crate::config::{SourceConfig, SslMode};

/// What the TLS handshake checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Nothing (`prefer`, `require` without `sslrootcert`).
    None,
    /// The chain leads to a trusted CA (`verify-ca`, `require` with `sslrootcert`).
    Chain,
    /// The chain, and the certificate names the host (`verify-full`).
    ChainAndName,
}

/// What `source.sslmode` (and `sslrootcert`, for `require`) make the handshake check.
pub fn verification(source: &SourceConfig) -> Verification {
    match source.sslmode {
        SslMode::Disable | SslMode::Prefer => Verification::None,
        SslMode::Require if source.sslrootcert.is_none() => Verification::None,
        SslMode::Require | SslMode::VerifyCa => Verification::Chain,
        SslMode::VerifyFull => Verification::ChainAndName,
    }
}

/// Why TLS could not be set up; decides the operator's hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsCause {
    /// `sslrootcert` is unusable, or `host` is no name TLS can check.
    Config,
    /// The server answered the TLS request with "no" (`ssl = off`).
    NotOffered,
    /// The certificate chain does not lead to a trusted CA, or a certificate in it is expired,
    /// not valid yet or malformed.
    Untrusted,
    /// The certificate does not name the host (`verify-full`).
    WrongName,
    /// The certificate names nothing the replication connection can pin (no subject
    /// alternative name), which it needs to check the chain.
    NoName,
    /// The handshake itself failed (protocol versions, cipher suites, an alert from the server).
    Handshake,
}

impl TlsCause {
    /// The operator's next step.
    pub fn hint(self) -> &'static str {
        match self {
            TlsCause::Config => {
                "set source.sslrootcert to a PEM file holding the CA certificate(s) that signed the server's certificate, and source.host to a host name or IP address"
            }
            TlsCause::NotOffered => {
                "enable TLS on the server (ssl = on with ssl_cert_file and ssl_key_file, then SELECT pg_reload_conf();), or on a trusted network only set sslmode = \"prefer\" under [source]"
            }
            TlsCause::Untrusted => {
                "set source.sslrootcert to the PEM file of the CA that signed the server's certificate (without it only the Mozilla roots are trusted), and check that certificate's dates on the server (ssl_cert_file)"
            }
            TlsCause::WrongName => {
                "set source.host to a name the server's certificate holds (a DNS name, or an IP address it lists), or use sslmode = \"verify-ca\" to check the chain but not the name"
            }
            TlsCause::NoName => {
                "give the server a certificate with a subject alternative name (DNS or IP), or set sslmode = \"require\" without sslrootcert (encrypted, not verified)"
            }
            TlsCause::Handshake => {
                "check the server's TLS settings (ssl_min_protocol_version, ssl_ciphers, ssl_cert_file) against source.sslmode; `sslmode = \"disable\"` only on a trusted network"
            }
        }
    }
}

/// A fatal TLS error for `source`'s sslmode.
pub fn tls_error(source: &SourceConfig, cause: TlsCause, detail: impl Into<String>) -> PgError {
    PgError::Tls {
        mode: source.sslmode.as_str(),
        cause,
        detail: detail.into(),
    }
}

/// The server answered the TLS request with "no".
pub fn not_offered(source: &SourceConfig) -> PgError {
    tls_error(
        source,
        TlsCause::NotOffered,
        format!("the server at {} does not offer TLS", target(source)),
    )
}

/// A name from rustls's list of the names a certificate presents (`DnsName("db")`,
/// `IpAddress(10.0.0.1)`), as an operator writes it.
fn presented_name(name: &str) -> &str {
    name.strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            name.strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(name)
}

/// The fatal error for a handshake that rustls refused.
pub fn handshake_error(source: &SourceConfig, e: &rustls::Error) -> PgError {
    let issuer = || match &source.sslrootcert {
        Some(path) => format!("a CA in {}", path.display()),
        None => "a CA among the Mozilla roots (source.sslrootcert is not set)".to_owned(),
    };
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => tls_error(
            source,
            TlsCause::Untrusted,
            format!("the server's certificate is not signed by {}", issuer()),
        ),
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => tls_error(
            source,
            TlsCause::Untrusted,
            format!(
                "the server's certificate is not signed by {} (its signature does not match the CA of that name)",
                issuer()
            ),
        ),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => tls_error(
            source,
            TlsCause::WrongName,
            format!("the server's certificate is not valid for {}", source.host),
        ),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            presented,
            ..
        }) => {
            let names: Vec<&str> = presented.iter().map(|n| presented_name(n)).collect();
            tls_error(
                source,
                TlsCause::WrongName,
                format!(
                    "the server's certificate is not valid for {} (it names {})",
                    source.host,
                    if names.is_empty() {
                        "no host: it has no subject alternative name".to_owned()
                    } else {
                        names.join(", ")
                    }
                ),
            )
        }
        rustls::Error::InvalidCertificate(c) => tls_error(
            source,
            TlsCause::Untrusted,
            format!("the server's certificate was rejected: {c}"),
        ),
        rustls::Error::NoCertificatesPresented => tls_error(
            source,
            TlsCause::Untrusted,
            "the server presented no certificate",
        ),
        rustls::Error::AlertReceived(alert) => tls_error(
            source,
            TlsCause::Handshake,
            format!("the server ended the TLS handshake with the alert {alert:?}"),
        ),
        other => tls_error(
            source,
            TlsCause::Handshake,
            format!("the TLS handshake failed: {other}"),
        ),
    }
}

/// The fatal TLS failure inside a control-connection error, if that is what made it fail. A
/// network failure during the handshake is not one (`None`): reconnecting may help.
pub fn control_failure(source: &SourceConfig, e: &tokio_postgres::Error) -> Option<PgError> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(rustls_error) = c.downcast_ref::<rustls::Error>() {
            return Some(handshake_error(source, rustls_error));
        }
        // tokio-rustls reports rustls's refusal as an io::Error wrapping it.
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(rustls_error) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(handshake_error(source, rustls_error));
        }
        // tokio-postgres's words for the server's "no" to the TLS request (a plain string).
        if c.to_string() == "server does not support TLS" {
            return Some(not_offered(source));
        }
        cause = c.source();
    }
    None
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads the trust anchors: `sslrootcert` when given, else the Mozilla roots.
pub fn root_store(source: &SourceConfig) -> Result<RootCertStore, PgError> {
    let config_err = |detail: String| tls_error(source, TlsCause::Config, detail);
    let mut roots = RootCertStore::empty();
    match &source.sslrootcert {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| config_err(format!("cannot read {}: {e}", path.display())))?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    config_err(format!("{} is not a PEM file: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    config_err(format!("{} holds a bad certificate: {e}", path.display()))
                })?;
                added += 1;
            }
            if added == 0 {
                return Err(config_err(format!(
                    "{} holds no PEM certificate",
                    path.display()
                )));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

/// The rustls client configuration that checks what [`verification`] says.
pub fn client_config(source: &SourceConfig) -> Result<rustls::ClientConfig, PgError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(source, TlsCause::Config, e.to_string()))?;
    Ok(match verification(source) {
        Verification::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { provider }))
            .with_no_client_auth(),
        Verification::Chain => {
            let inner = WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(source)?),
                provider,
            )
            .build()
            .map_err(|e| tls_error(source, TlsCause::Config, e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { inner }))
                .with_no_client_auth()
        }
        Verification::ChainAndName => builder
            .with_root_certificates(root_store(source)?)
            .with_no_client_auth(),
    })
}

/// The control plane's connector for `sslmode` prefer / require / verify-ca / verify-full.
pub fn make_connector(
    source: &SourceConfig,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PgError> {
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
        client_config(source)?,
    ))
}

/// The name rustls checks the certificate against: `host` as a DNS name or an IP address.
pub fn server_name(source: &SourceConfig) -> Result<ServerName<'static>, PgError> {
    ServerName::try_from(source.host.clone()).map_err(|_| {
        tls_error(
            source,
            TlsCause::Config,
            format!(
                "source.host {:?} is neither a DNS name nor an IP address, so no certificate can name it",
                source.host
            ),
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn source(host: &str, sslmode: &str, rootcert: bool) -> SourceConfig {
        let rootcert = if rootcert {
            format!(
                "sslrootcert = {:?}",
                concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")
            )
        } else {
            String::new()
        };
        let text = format!(
            "name = \"p\"\n[source]\nhost = {host:?}\ndatabase = \"app\"\nuser = \"u\"\n\
             table = \"users\"\nsslmode = {sslmode:?}\n{rootcert}\n\
             [destination]\ntype = \"stdout\"\n"
        );
        Config::from_toml_str(&text, std::path::Path::new("t.toml"), std::iter::empty())
            .expect("valid config")
            .source
    }

    #[test]
    fn require_checks_the_chain_only_with_a_root_certificate_as_in_libpq() {
        let cases = [
            ("disable", false, Verification::None),
            ("prefer", true, Verification::None),
            ("require", false, Verification::None),
            ("require", true, Verification::Chain),
            ("verify-ca", false, Verification::Chain),
            ("verify-ca", true, Verification::Chain),
            ("verify-full", true, Verification::ChainAndName),
        ];
        for (mode, rootcert, expected) in cases {
            assert_eq!(
                verification(&source("db", mode, rootcert)),
                expected,
                "{mode} with sslrootcert: {rootcert}"
            );
        }
    }

    #[test]
    fn a_name_mismatch_names_the_host_and_what_the_certificate_holds() {
        let src = source("10.0.0.5", "verify-full", true);
        let e = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("10.0.0.5").expect("ip"),
            presented: vec![
                "DnsName(\"db.internal\")".into(),
                "IpAddress(10.0.0.6)".into(),
                "Unsupported(0x01)".into(),
            ],
        });
        let err = handshake_error(&src, &e);
        assert_eq!(
            err.to_string(),
            "cannot set up TLS (verify-full): the server's certificate is not valid for 10.0.0.5 (it names db.internal, 10.0.0.6, Unsupported(0x01))"
        );
        assert!(!err.is_retryable());
        assert!(err.hint().contains("verify-ca"), "{}", err.hint());
    }

    #[test]
    fn an_unreadable_root_certificate_file_is_a_configuration_error() {
        let mut src = source("db", "verify-ca", true);
        src.sslrootcert = Some(std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/Cargo.toml"
        )));
        let err = root_store(&src).expect_err("Cargo.toml holds no certificate");
        assert!(
            matches!(
                err,
                PgError::Tls {
                    cause: TlsCause::Config,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().ends_with("holds no PEM certificate"),
            "{err}"
        );
    }

    #[test]
    fn a_host_tls_cannot_name_is_a_configuration_error() {
        let err =
            server_name(&source("not a host!", "verify-full", false)).expect_err("not a DNS name");
        assert!(!err.is_retryable(), "{err}");
        assert!(err.to_string().contains("\"not a host!\""), "{err}");
    }
}
