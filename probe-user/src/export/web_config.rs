//! The web config file (`faultline run --web-config-file`), in the format of Prometheus'
//! exporter-toolkit so that the file an exporter already has works here: `tls_server_config`
//! (a certificate and key, client certificates verified against a CA, the lowest and highest
//! TLS version) and `basic_auth_users` (user: bcrypt hash). This module owns reading it,
//! checking it and turning it into a rustls server configuration and the users' hashes; it is
//! done before anything loads, and what faultline cannot honour (an unknown key, a client
//! certificate asked for but not verified, TLS below 1.2) is an error, never ignored. Relative
//! paths are relative to the file's directory, as exporter-toolkit has them. The files are
//! read once, at start: a renewed certificate takes a restart.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::Deserialize;

/// The file as written (exporter-toolkit's names).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: ClientAuth,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    min_version: Option<TlsVersion>,
    #[serde(default)]
    max_version: Option<TlsVersion>,
}

/// `client_auth_type`: Go's `tls.ClientAuthType` names, as exporter-toolkit takes them.
#[derive(Deserialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    #[default]
    NoClientCert,
    /// Asks for a certificate and does not verify it: refused here (it proves nothing).
    RequestClientCert,
    /// Requires a certificate and does not verify it: refused here (it proves nothing).
    #[serde(alias = "RequireClientCert")]
    RequireAnyClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

/// `min_version`/`max_version`.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TlsVersion {
    #[serde(rename = "TLS10")]
    Tls10,
    #[serde(rename = "TLS11")]
    Tls11,
    #[serde(rename = "TLS12")]
    Tls12,
    #[serde(rename = "TLS13")]
    Tls13,
}

/// What the file configures, checked and ready (nothing, without a file).
#[derive(Default)]
pub struct WebConfig {
    /// TLS on the port, when `tls_server_config` is there.
    pub tls: Option<Tls>,
    /// `basic_auth_users`: each user's bcrypt hash (checked to be one).
    pub users: BTreeMap<String, String>,
}

/// The port's TLS, and whether a verified client certificate is required.
pub struct Tls {
    pub config: Arc<rustls::ServerConfig>,
    pub client_auth: ClientAuth,
}

impl WebConfig {
    /// Reads and checks the file at `path`: a mistake is one error naming the file.
    pub fn read(path: &Path) -> anyhow::Result<WebConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the web config file {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, dir).with_context(|| format!("the web config file {}", path.display()))
    }

    /// The file's text, its relative paths taken from `dir`.
    fn parse(text: &str, dir: &Path) -> anyhow::Result<WebConfig> {
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            // Its message says the line and column, not the YAML: one line of it.
            serde_saphyr::from_str(text).map_err(|e| {
                let msg = e.to_string();
                anyhow::anyhow!("{}", msg.lines().next().unwrap_or("not YAML"))
            })?
        };
        for (user, hash) in &file.basic_auth_users {
            hash.parse::<bcrypt::HashParts>().map_err(|_| {
                anyhow::anyhow!(
                    "basic_auth_users: the hash of {user:?} is not a bcrypt hash ($2y$..., e.g. from `htpasswd -nBC 10 {user}`)"
                )
            })?;
        }
        let tls = match file.tls_server_config {
            Some(t) => Some(t.build(dir).context("tls_server_config")?),
            None => None,
        };
        Ok(WebConfig {
            tls,
            users: file.basic_auth_users,
        })
    }
}

impl TlsFile {
    fn build(self, dir: &Path) -> anyhow::Result<Tls> {
        let at = |p: &Path| dir.join(p);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let min = self.min_version.unwrap_or(TlsVersion::Tls12);
        let max = self.max_version.unwrap_or(TlsVersion::Tls13);
        if min < TlsVersion::Tls12 || max < TlsVersion::Tls12 {
            bail!("TLS 1.0 and 1.1 are not offered (faultline speaks TLS 1.2 and 1.3)");
        }
        if min > max {
            bail!("min_version is above max_version");
        }
        let versions: &[&rustls::SupportedProtocolVersion] = match (min, max) {
            (TlsVersion::Tls13, _) => &[&rustls::version::TLS13],
            (_, TlsVersion::Tls12) => &[&rustls::version::TLS12],
            _ => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .context("TLS versions")?;
        let verify =
            |ca: &Option<PathBuf>| -> anyhow::Result<rustls::server::ClientCertVerifierBuilder> {
                let Some(ca) = ca else {
                    bail!(
                        "client_auth_type {:?} needs client_ca_file (the CA that signs the clients' certificates)",
                        self.client_auth_type
                    );
                };
                let mut roots = rustls::RootCertStore::empty();
                let (added, _) =
                    roots.add_parsable_certificates(certificates(&at(ca), "client_ca_file")?);
                if added == 0 {
                    bail!(
                        "client_ca_file {}: no CA certificate in it",
                        at(ca).display()
                    );
                }
                Ok(rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                ))
            };
        let builder = match self.client_auth_type {
            ClientAuth::NoClientCert if self.client_ca_file.is_some() => bail!(
                "client_ca_file is set but client_auth_type is NoClientCert: say RequireAndVerifyClientCert (or VerifyClientCertIfGiven)"
            ),
            ClientAuth::NoClientCert => builder.with_no_client_auth(),
            ClientAuth::RequestClientCert | ClientAuth::RequireAnyClientCert => bail!(
                "client_auth_type {:?} takes a client certificate without verifying it, which proves nothing: use RequireAndVerifyClientCert with client_ca_file",
                self.client_auth_type
            ),
            ClientAuth::VerifyClientCertIfGiven => builder.with_client_cert_verifier(
                verify(&self.client_ca_file)?
                    .allow_unauthenticated()
                    .build()
                    .context("client_ca_file")?,
            ),
            ClientAuth::RequireAndVerifyClientCert => builder.with_client_cert_verifier(
                verify(&self.client_ca_file)?
                    .build()
                    .context("client_ca_file")?,
            ),
        };
        let chain = certificates(&at(&self.cert_file), "cert_file")?;
        let key = PrivateKeyDer::from_pem_file(at(&self.key_file))
            .with_context(|| format!("key_file {}", at(&self.key_file).display()))?;
        let mut config = builder
            .with_single_cert(chain, key)
            .context("cert_file and key_file do not make a certificate and its key")?;
        // The server speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            config: Arc::new(config),
            client_auth: self.client_auth_type,
        })
    }
}

/// The PEM certificates in `path` (at least one), an error naming `what` otherwise.
pub fn certificates(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("{what} {}", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {}: no PEM certificate in it", path.display());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        match WebConfig::parse(text, Path::new("/nonexistent")) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn users_are_bcrypt_hashes_and_an_empty_file_configures_nothing() {
        // Cost 4: cheap for a test; the check does not care about the cost.
        let hash = bcrypt::hash("secret", 4).unwrap();
        let c = WebConfig::parse(
            &format!("basic_auth_users:\n  prometheus: '{hash}'\n"),
            Path::new("."),
        )
        .unwrap();
        assert!(c.tls.is_none());
        assert_eq!(c.users.get("prometheus"), Some(&hash));
        let empty = WebConfig::parse("", Path::new(".")).unwrap();
        assert!(empty.tls.is_none() && empty.users.is_empty());
        assert_eq!(
            error("basic_auth_users:\n  alice: plain-text\n"),
            "basic_auth_users: the hash of \"alice\" is not a bcrypt hash ($2y$..., e.g. from `htpasswd -nBC 10 alice`)"
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_an_error() {
        assert!(error("http_server_config:\n  http2: false\n").contains("unknown field"));
        let tls = |rest: &str| {
            error(&format!(
                "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n{rest}"
            ))
        };
        assert!(
            tls("  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.pem\n")
                .contains("proves nothing"),
        );
        assert!(tls("  client_ca_file: ca.pem\n").contains("client_auth_type is NoClientCert"));
        assert!(
            tls("  client_auth_type: RequireAndVerifyClientCert\n")
                .contains("needs client_ca_file")
        );
        assert!(tls("  min_version: TLS10\n").contains("TLS 1.0 and 1.1"));
        assert!(tls("  min_version: TLS13\n  max_version: TLS12\n").contains("above max_version"));
        assert!(tls("  client_auth_type: Sometimes\n").contains("unknown variant"));
        // The files are read relative to the config's directory.
        assert!(
            tls("").contains("cert_file /nonexistent/c.pem"),
            "{}",
            tls("")
        );
    }
}
