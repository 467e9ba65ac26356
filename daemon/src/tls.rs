//! Cluster identity: a cluster CA, node certificates valid for both client
//! and server authentication, and the rustls configurations for mutual TLS.
//! The crypto provider (ring) is passed explicitly everywhere; nothing relies
//! on a process-wide default.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use phalanx_protocol::wire::ALPN;

/// The CA's subject. Fixed, so an issuer can be rebuilt from the CA key alone
/// (the subject must match the CA certificate byte for byte).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Phalanx cluster CA");
    dn.push(DnType::OrganizationName, "Phalanx");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

fn write_public(path: &Path, contents: &str) -> Result<()> {
    if path.exists() {
        bail!(
            "{} exists already; refusing to overwrite it",
            path.display()
        );
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// Creates `dir/ca.pem` and `dir/ca.key`. Refuses to overwrite an existing CA.
pub fn init_ca(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate().context("generating the CA key")?;
    let cert = ca_params()
        .self_signed(&key)
        .context("self-signing the CA")?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    write_public(&cert_path, &cert.pem())?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// Issues `dir/NAME.pem` and `dir/NAME.key` for node `name`, signed by the CA
/// in `dir`, valid as a TLS server and client for the DNS name `name`.
pub fn issue_node(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        bail!("node name {name:?} must be a DNS name: letters, digits, '-' and '.'");
    }
    let ca_key_path = dir.join("ca.key");
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).with_context(|| {
        format!(
            "reading {} (run `phalanxctl certs init` first)",
            ca_key_path.display()
        )
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("parsing the CA key")?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut params =
        CertificateParams::new(vec![name.to_string()]).context("node certificate parameters")?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().context("generating the node key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the node certificate")?;
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    write_public(&cert_path, &cert.pem())?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// Paths to this node's identity.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading the private key in {}", path.display()))
}

/// The provider every rustls object here is built with. AES-128-GCM comes
/// first: every tensor byte is sealed and opened once per hop, and it is the
/// cheapest suite with AES-NI.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The loaded identity and the rustls configurations derived from it.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Roots: the cluster CA.
    pub roots: Arc<RootCertStore>,
    /// rustls server side: requires a client certificate from the cluster CA.
    pub server: Arc<rustls::ServerConfig>,
    /// rustls client side: presents this node's certificate.
    pub client: Arc<rustls::ClientConfig>,
    /// rustls client side for `phalanxd --join ADDR`: the address's node
    /// name is not known yet, so any node certificate of the cluster CA is
    /// accepted (the chain is checked as usual; the name is learnt from the
    /// answer and checked on every later connection).
    pub join_client: Arc<rustls::ClientConfig>,
}

/// Verifies a server's chain against the cluster CA but not its name.
#[derive(Debug)]
struct AnyNodeOfTheCa(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for AnyNodeOfTheCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        // The chain is checked before the name: a name mismatch means the
        // certificate is one of the cluster's nodes.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Loads the CA, certificate and key, and builds both TLS configurations.
pub fn load(files: &TlsFiles) -> Result<Identity> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&files.ca)? {
        roots
            .add(ca)
            .with_context(|| format!("adding the CA in {}", files.ca.display()))?;
    }
    let roots = Arc::new(roots);
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .context("building the client-certificate verifier")?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .with_context(|| {
            format!(
                "using {} with {}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut join_client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyNodeOfTheCa(
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots.clone(),
                provider.clone(),
            )
            .build()
            .context("building the server-certificate verifier")?,
        )))
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .context("using the node certificate as a client certificate")?;
    join_client.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain, key)
        .context("using the node certificate as a client certificate")?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Identity {
        roots,
        server: Arc::new(server),
        client: Arc::new(client),
        join_client: Arc::new(join_client),
    })
}

/// Whether `cert` (already verified against the cluster CA by the handshake)
/// names `name`: how an acceptor ties a connection to the member it claims.
pub fn cert_names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name.to_string()) else {
        return false;
    };
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee.verify_is_valid_for_subject_name(&server_name).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_node_certificates_load_and_name_their_node() {
        let dir = std::env::temp_dir().join(format!("phalanx-tls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init_ca(&dir).unwrap();
        assert!(
            init_ca(&dir).is_err(),
            "a second init must not overwrite the CA"
        );
        issue_node(&dir, "node1").unwrap();
        assert!(issue_node(&dir, "bad name").is_err());
        let id = load(&TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("node1.pem"),
            key: dir.join("node1.key"),
        })
        .unwrap();
        assert_eq!(id.server.alpn_protocols, vec![ALPN.to_vec()]);
        let cert = &read_certs(&dir.join("node1.pem")).unwrap()[0];
        assert!(cert_names(cert, "node1"));
        assert!(!cert_names(cert, "node2"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("node1.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
