//! The rustls client configuration of a `rediss://` store: the CA given with
//! [`tls_ca_pem`](super::RemoteConfigBuilder::tls_ca_pem) or the system's roots, and the client
//! certificate for mutual TLS. Built once per store, when it is opened.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::config::{ConfigError, RemoteConfig};

fn tls_err(what: &str, e: impl std::fmt::Display) -> ConfigError {
    ConfigError::Tls {
        reason: format!("{what}: {e}"),
    }
}

/// The client configuration, or `None` for `redis://` URLs.
pub(crate) fn client_config(
    config: &RemoteConfig,
) -> Result<Option<Arc<rustls::ClientConfig>>, ConfigError> {
    if !config.endpoints.first().is_some_and(|e| e.tls) {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    match &config.tls.ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| tls_err("CA certificate PEM", e))?;
                roots.add(cert).map_err(|e| tls_err("CA certificate", e))?;
            }
            if roots.is_empty() {
                return Err(tls_err("CA certificate PEM", "no certificate in it"));
            }
        }
        None => {
            // Unreadable system certificates leave fewer roots: servers they would have
            // vouched for are refused at connection time (counted), never trusted.
            let found = rustls_native_certs::load_native_certs();
            if !found.errors.is_empty() {
                tracing::warn!(
                    errors = found.errors.len(),
                    "remote tier: some system root certificates could not be loaded"
                );
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "remote tier: system root certificates");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("TLS versions", e))?
        .with_root_certificates(roots);
    let client = match &config.tls.client_pem {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_err("client certificate PEM", e))?;
            // The key's parse error names the PEM section, never its content.
            let key =
                PrivateKeyDer::from_pem_slice(key).map_err(|e| tls_err("client key PEM", e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| tls_err("client certificate", e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(client)))
}
