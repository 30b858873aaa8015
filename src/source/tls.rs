//! TLS for the replication connection, with the control plane's semantics (`postgres::tls`).
//!
//! pgwire-replication does the walsender session's handshake itself, and on its own it departs
//! from libpq in two ways: its `verify-ca` still compares the host name (it lets through only a
//! rustls error variant that rustls no longer returns, so any name mismatch fails), and its
//! `verify-full` refuses an IP address in `host`. What it offers is the mode, the CA file and
//! the name to check the certificate against instead of the host (`sni_hostname`). So a
//! session opens in two steps:
//!
//! 1. A probe: a TCP connection, the TLS request and a handshake with the control plane's own
//!    rustls configuration, which checks exactly what libpq would and fails with the same
//!    fatal [`PgError::Tls`] as the control connection. The probe closes (TLS close_notify)
//!    before sending a startup packet, which the server does not log.
//! 2. The session, configured to check at least as much on its own handshake:
//!    - `require` (no `sslrootcert`): the crate's `require`, which checks nothing;
//!    - `verify-full`: the crate's `verify-full` against `sslrootcert`, with the name to check
//!      set to `host` itself, so that an IP address is checked against the certificate's IP
//!      addresses (rustls verifies IP names) instead of being refused;
//!    - `verify-ca` (and `require` with `sslrootcert`): the crate checks the chain against
//!      `sslrootcert` and a name the probe found in the server's certificate (`host` when the
//!      certificate names it). The name check then passes for the certificate the probe saw,
//!      which is what `verify-ca` means, while the chain is still verified on the session's
//!      own handshake. A certificate with no subject alternative name cannot be pinned that
//!      way: that is a clear fatal error (`TlsCause::NoName`).
//!
//! A TLS failure of the session after a successful probe (the certificate changed in
//! between, the network broke during the handshake) is retryable: the next attempt probes
//! again and stops with the probe's fatal error if the configuration is really wrong.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::TlsConfig;
use rustls::client::verify_server_name;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::ParsedCertificate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{SourceConfig, SslMode};
use crate::postgres::tls::{
    TlsCause, Verification, client_config, handshake_error, not_offered, server_name, tls_error,
    verification,
};
use crate::postgres::{PgError, target};

/// How long the probe may take, connection and handshake together (as the control plane's
/// connect timeout).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol's SSLRequest: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// The TLS settings of a replication session for `source`: probes the server first when the
/// mode requires TLS (see the module documentation).
pub async fn session_tls(source: &SourceConfig) -> Result<TlsConfig, PgError> {
    // TLS does not apply to a unix socket (as in libpq).
    if source.host.starts_with('/') {
        return Ok(TlsConfig::disabled());
    }
    match source.sslmode {
        SslMode::Disable => return Ok(TlsConfig::disabled()),
        SslMode::Prefer => {
            return Ok(TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::default()
            });
        }
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {}
    }
    let leaf = probe(source).await?;
    Ok(match verification(source) {
        Verification::None => TlsConfig::require(),
        Verification::ChainAndName => TlsConfig::verify_full(source.sslrootcert.clone())
            .with_sni_hostname(source.host.clone()),
        Verification::Chain => TlsConfig::verify_ca(source.sslrootcert.clone())
            .with_sni_hostname(pinned_name(source, &leaf)?),
    })
}

/// Connects, asks for TLS and completes a handshake that checks what `sslmode` says; returns
/// the server's certificate.
async fn probe(source: &SourceConfig) -> Result<CertificateDer<'static>, PgError> {
    let config = Arc::new(client_config(source)?);
    let name = server_name(source)?;
    let unreachable = |detail: String| PgError::Connect {
        target: target(source),
        user: source.user.clone(),
        detail,
        code: None,
    };
    let handshake = async {
        let mut tcp = TcpStream::connect((source.host.as_str(), source.port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tcp.write_all(&SSL_REQUEST)
            .await
            .map_err(|e| unreachable(format!("sending the TLS request: {e}")))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| unreachable(format!("reading the answer to the TLS request: {e}")))?;
        if answer[0] != b'S' {
            return Err(not_offered(source));
        }
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| {
                match e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                {
                    Some(refused) => handshake_error(source, refused),
                    None => unreachable(format!("the TLS handshake broke off: {e}")),
                }
            })?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| cert.clone().into_owned());
        // close_notify: the server sees a clean end before any startup packet, and logs
        // nothing.
        let _ = tls.shutdown().await;
        leaf.ok_or_else(|| {
            tls_error(
                source,
                TlsCause::Untrusted,
                "the server presented no certificate",
            )
        })
    };
    tokio::time::timeout(PROBE_TIMEOUT, handshake)
        .await
        .unwrap_or_else(|_| {
            Err(unreachable(format!(
                "no TLS handshake within {} s",
                PROBE_TIMEOUT.as_secs()
            )))
        })
}

/// The name the session checks the certificate against under `verify-ca`: `host` when the
/// certificate names it, else the first subject alternative name the certificate is valid for.
fn pinned_name(source: &SourceConfig, leaf: &CertificateDer<'_>) -> Result<String, PgError> {
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| handshake_error(source, &e))?;
    let valid_for = |name: &str| {
        ServerName::try_from(name)
            .is_ok_and(|server_name| verify_server_name(&parsed, &server_name).is_ok())
    };
    if valid_for(&source.host) {
        return Ok(source.host.clone());
    }
    subject_alt_names(leaf)
        .into_iter()
        .find(|name| valid_for(name))
        .ok_or_else(|| {
            tls_error(
                source,
                TlsCause::NoName,
                "the server's certificate has no subject alternative name, which the replication connection needs to check its chain",
            )
        })
}

/// The DNS names and IP addresses a certificate lists as subject alternative names, as names
/// to check against; a wildcard `*.example.com` becomes a name it covers.
fn subject_alt_names(leaf: &CertificateDer<'_>) -> Vec<String> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;

    let Ok(cert) = x509_cert::Certificate::from_der(leaf.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some((_, names))) = cert.tbs_certificate.get::<SubjectAltName>() else {
        return Vec::new();
    };
    names
        .0
        .iter()
        .filter_map(|name| match name {
            GeneralName::DnsName(dns) => Some(match dns.as_str().strip_prefix("*.") {
                Some(parent) => format!("slotstream.{parent}"),
                None => dns.as_str().to_owned(),
            }),
            GeneralName::IpAddress(octets) => {
                let ip = match octets.as_bytes().len() {
                    4 => <[u8; 4]>::try_from(octets.as_bytes())
                        .ok()
                        .map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(octets.as_bytes())
                        .ok()
                        .map(IpAddr::from),
                    _ => None,
                };
                ip.map(|ip| ip.to_string())
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Self-signed; subject alternative names `*.example.com`, `db.local`, 10.1.2.3, ::1.
    const WITH_NAMES: &str = "
-----BEGIN CERTIFICATE-----
MIIBszCCAVmgAwIBAgIUT2f/Fj+6hXBjYjfa+E/1vsX48K8wCgYIKoZIzj0EAwIw
DzENMAsGA1UEAwwEd2lsZDAgFw0yNjEyMDIwMzEwMDRaGA8yMTI2MTEwODAzMTAw
NFowDzENMAsGA1UEAwwEd2lsZDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABLEQ
8Bvsmjqv+GUYPSKHD16ndi3/3E1+Kb9OK6kJnJhtoBbBbJ1BeKyMpj4iqDDAoJtK
4PpKl3vg/ViEP2zBh1ejgZAwgY0wHQYDVR0OBBYEFB871yQcPBL2BqW8jLxWGQG8
joP5MB8GA1UdIwQYMBaAFB871yQcPBL2BqW8jLxWGQG8joP5MA8GA1UdEwEB/wQF
MAMBAf8wOgYDVR0RBDMwMYINKi5leGFtcGxlLmNvbYIIZGIubG9jYWyHBAoBAgOH
EAAAAAAAAAAAAAAAAAAAAAEwCgYIKoZIzj0EAwIDSAAwRQIgHu5D8kWWBJqG21Pu
1wt9Bo7sEEzsqPkABccZlImhFS4CIQDwYVpS8a+Zgmg3x+OoPz/iVhIyOC5nu/Gb
YevNsYcrew==
-----END CERTIFICATE-----
";

    /// Self-signed, `CN=db.local` and no subject alternative name.
    const WITHOUT_NAMES: &str = "
-----BEGIN CERTIFICATE-----
MIIBfDCCASOgAwIBAgIUPH1jFsmyd3sHTLnIilrw12qRLIIwCgYIKoZIzj0EAwIw
EzERMA8GA1UEAwwIZGIubG9jYWwwIBcNMjYxMjAyMDMxMDA0WhgPMjEyNjExMDgw
MzEwMDRaMBMxETAPBgNVBAMMCGRiLmxvY2FsMFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAEHkDXwP6bRGI4Y1lP1uquvJHBQ2POn2lCRUkFXitmr7AQHCjzjjpbDCVH
rfOKB8A2zucT85oVzuiO3AqVhp4AkqNTMFEwHQYDVR0OBBYEFMeH+AhodbQZONv0
EmSoGEDGPrH0MB8GA1UdIwQYMBaAFMeH+AhodbQZONv0EmSoGEDGPrH0MA8GA1Ud
EwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIgbxp8VQ27+bdueiNv3slEfNRS
HyPYecW+XLYk3f0jIwQCIC6ooM4Gkj6yclzzd71SDfVVkFfse3Yv/lGqJkZFvZFK
-----END CERTIFICATE-----
";

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("one certificate")
            .expect("PEM")
    }

    fn source(host: &str) -> SourceConfig {
        let text = format!(
            "name = \"p\"\n[source]\nhost = {host:?}\ndatabase = \"app\"\nuser = \"u\"\n\
             table = \"users\"\nsslmode = \"verify-ca\"\n[destination]\ntype = \"stdout\"\n"
        );
        Config::from_toml_str(&text, std::path::Path::new("t.toml"), std::iter::empty())
            .expect("valid config")
            .source
    }

    #[test]
    fn subject_alt_names_are_read_as_names_to_check() {
        assert_eq!(
            subject_alt_names(&der(WITH_NAMES)),
            ["slotstream.example.com", "db.local", "10.1.2.3", "::1"]
        );
        assert!(subject_alt_names(&der(WITHOUT_NAMES)).is_empty());
    }

    #[test]
    fn verify_ca_pins_the_host_when_the_certificate_names_it_else_one_of_its_names() {
        let cert = der(WITH_NAMES);
        for named in ["db.local", "replica.example.com", "10.1.2.3", "::1"] {
            assert_eq!(pinned_name(&source(named), &cert).expect("pinned"), named);
        }
        for other in ["elsewhere", "10.9.9.9"] {
            assert_eq!(
                pinned_name(&source(other), &cert).expect("pinned"),
                "slotstream.example.com"
            );
        }
    }

    #[test]
    fn verify_ca_cannot_pin_a_certificate_without_subject_alt_names() {
        // rustls, unlike libpq, never reads the common name.
        let err = pinned_name(&source("db.local"), &der(WITHOUT_NAMES)).expect_err("no name");
        assert!(
            matches!(
                err,
                PgError::Tls {
                    cause: TlsCause::NoName,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!err.is_retryable());
    }
}
