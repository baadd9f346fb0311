//! TLS for QUIC: certificates and keys from PEM files, trust by CA or pinned fingerprint,
//! and development certificates.
//!
//! Every node presents its certificate both as a server and, for mutual TLS, as a client.
//! A server asks dialing peers for a certificate but does not require one: a viewer has
//! none. Whether a peer proved itself a node (a certificate the trust settings accept) is
//! kept per connection, and the daemons refuse node-only requests (publishing to a set
//! reflector, subscribing to one, asking an entry point for repairs) from peers that did not.
//!
//! Trust is a CA (`ca`), pinned SHA-256 fingerprints of peer certificates (`pin`), or both.
//! With neither, a dialing client (a viewer) trusts the system's roots and a server
//! authenticates no peer as a node. Accepting any certificate exists only behind
//! `dangerous_accept_any_certificate`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};

/// The ALPN protocol name of Braid over QUIC.
pub const ALPN: &[u8] = b"braid/1";

/// TLS settings of a daemon or client (`[tls]` in TOML, `--tls-*` flags).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain this node presents (as server, and as client for mutual TLS).
    #[arg(long = "tls-cert", id = "tls_cert")]
    pub cert: Option<PathBuf>,
    /// PEM private key of `tls-cert`.
    #[arg(long = "tls-key", id = "tls_key")]
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s): peers with a certificate they signed are trusted.
    #[arg(long = "tls-ca", id = "tls_ca")]
    pub ca: Option<PathBuf>,
    /// SHA-256 fingerprint (hex) of a peer certificate trusted as it is (repeatable).
    #[arg(long = "tls-pin", id = "tls_pin")]
    pub pin: Vec<String>,
    /// Name a dialed peer's certificate must carry (default: the peer's IP address).
    #[arg(long = "tls-server-name", id = "tls_server_name")]
    pub server_name: Option<String>,
    /// DANGEROUS: trust any certificate (no authentication of peers at all; encryption
    /// only). For experiments, never for a real network.
    #[arg(
        long = "tls-dangerous-accept-any-certificate",
        id = "tls_dangerous_accept_any_certificate"
    )]
    pub dangerous_accept_any_certificate: bool,
}

impl Tls {
    /// Checks the settings without reading the files.
    pub fn validate(&self) -> Result<(), String> {
        if self.cert.is_some() != self.key.is_some() {
            return Err("tls: cert and key go together: give both or neither".into());
        }
        for p in &self.pin {
            parse_pin(p)?;
        }
        Ok(())
    }

    /// Whether this node has a certificate to present.
    pub fn has_identity(&self) -> bool {
        self.cert.is_some()
    }

    fn identity(
        &self,
    ) -> anyhow::Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Ok(None);
        };
        let certs = load_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading TLS key {}", key.display()))?;
        Ok(Some((certs, key)))
    }

    fn trust(&self, system_roots: bool) -> anyhow::Result<Arc<Trust>> {
        let provider = provider();
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &self.ca {
            for c in load_certs(ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("CA certificate in {}", ca.display()))?;
            }
        } else if system_roots && self.pin.is_empty() && !self.dangerous_accept_any_certificate {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
        }
        let pins = self
            .pin
            .iter()
            .map(|p| parse_pin(p).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let roots = Arc::new(roots);
        let (server, client) = if roots.is_empty() {
            (None, None)
        } else {
            (
                Some(
                    rustls::client::WebPkiServerVerifier::builder_with_provider(
                        roots.clone(),
                        provider.clone(),
                    )
                    .build()
                    .context("building the server certificate verifier")?,
                ),
                Some(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(
                        roots,
                        provider.clone(),
                    )
                    .allow_unauthenticated()
                    .build()
                    .context("building the client certificate verifier")?,
                ),
            )
        };
        Ok(Arc::new(Trust {
            server,
            client,
            pins,
            any: self.dangerous_accept_any_certificate,
            algorithms: provider.signature_verification_algorithms,
        }))
    }

    /// Whether peers can be authenticated as nodes at all.
    pub fn authenticates_peers(&self) -> bool {
        self.ca.is_some() || !self.pin.is_empty() || self.dangerous_accept_any_certificate
    }

    /// The QUIC server side: this node's certificate, client certificates asked for and
    /// checked when offered.
    pub fn server_config(&self) -> anyhow::Result<Option<rustls::ServerConfig>> {
        let Some((certs, key)) = self.identity()? else {
            return Ok(None);
        };
        let trust = self.trust(false)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?;
        let mut config = if self.authenticates_peers() {
            builder.with_client_cert_verifier(trust)
        } else {
            builder.with_no_client_auth()
        }
        .with_single_cert(certs, key)
        .context("the TLS certificate does not match its key")?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.ticketer = Arc::new(Tickets(
            rustls::crypto::ring::Ticketer::new().context("a session ticket key")?,
        ));
        Ok(Some(config))
    }

    /// The QUIC client side: peers checked against the trust settings (the system roots
    /// when none are given), this node's certificate offered when it has one.
    pub fn client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        let trust = self.trust(true)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .dangerous()
            .with_custom_certificate_verifier(trust);
        let mut config = match self.identity()? {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .context("the TLS certificate does not match its key")?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// Session tickets: a returning peer (a viewer switching back to an edge, a node
/// reconnecting) resumes its TLS session without a new certificate signature, on any
/// number of peers: the session's state travels sealed in the ticket (ChaCha20-Poly1305
/// under a key of this process, rotated every 6 h), where rustls' default keeps the
/// last 256 sessions in memory and a busy edge's returning viewers miss it. Each ticket
/// presented is counted, `braid_tls_tickets_total{result="accepted"|"refused"}` (one
/// sealed by an earlier process of this node, or under a key rotated out, is refused,
/// and the handshake is a full one).
#[derive(Debug)]
struct Tickets(Arc<dyn rustls::server::ProducesTickets>);

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        self.0.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.0.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.0.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.0.decrypt(cipher);
        let result = if plain.is_some() {
            "accepted"
        } else {
            "refused"
        };
        metrics::counter!("braid_tls_tickets_total", "result" => result).increment(1);
        plain
    }
}

/// One TLS handshake between `client` and `server` in memory (to `127.0.0.1`), the
/// server's session tickets delivered after it: how it went, and the time the server
/// side took. For tests and benchmarks of the configurations above.
pub fn handshake_in_memory(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
) -> (rustls::HandshakeKind, std::time::Duration) {
    let name = ServerName::try_from("127.0.0.1").expect("an address");
    let mut c = rustls::ClientConnection::new(client.clone(), name).expect("a client");
    let mut spent = std::time::Duration::ZERO;
    let t = std::time::Instant::now();
    let mut s = rustls::ServerConnection::new(server.clone()).expect("a server");
    spent += t.elapsed();
    let mut wire = Vec::new();
    for _ in 0..10 {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).expect("to memory");
        }
        let t = std::time::Instant::now();
        s.read_tls(&mut &wire[..]).expect("from memory");
        s.process_new_packets().expect("the client's flight");
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).expect("to memory");
        }
        spent += t.elapsed();
        c.read_tls(&mut &wire[..]).expect("from memory");
        c.process_new_packets().expect("the server's flight");
        if !c.is_handshaking() && !s.is_handshaking() && !s.wants_write() {
            break;
        }
    }
    assert!(!c.is_handshaking(), "the handshake ended");
    (c.handshake_kind().expect("a handshake kind"), spent)
}

/// The crypto provider used everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

/// The SHA-256 fingerprint of a DER certificate, as lowercase hex (what `pin` takes).
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The fingerprint of the first certificate in a PEM file.
pub fn fingerprint_file(path: &Path) -> anyhow::Result<String> {
    Ok(fingerprint(&load_certs(path)?[0]))
}

fn parse_pin(p: &str) -> Result<[u8; 32], String> {
    let hex: String = p.chars().filter(|c| *c != ':').collect();
    let bad = || format!("tls pin {p:?} is not a SHA-256 fingerprint (64 hex digits)");
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Checks peers' certificates: pinned fingerprints, then the CA, then (only if asked for)
/// anything. Handshake signatures are always checked.
struct Trust {
    server: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    client: Option<Arc<dyn ClientCertVerifier>>,
    pins: Vec<[u8; 32]>,
    any: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("ca", &self.server.is_some())
            .field("pins", &self.pins.len())
            .field("any", &self.any)
            .finish()
    }
}

impl Trust {
    fn pinned(&self, end_entity: &CertificateDer<'_>) -> bool {
        let d = ring::digest::digest(&ring::digest::SHA256, end_entity);
        self.pins.iter().any(|p| p[..] == *d.as_ref())
    }

    fn untrusted() -> rustls::Error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    }
}

impl ServerCertVerifier for Trust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.any || self.pinned(end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.server {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(Self::untrusted()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for Trust {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.client.as_ref().map_or(&[], |c| c.root_hint_subjects())
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.any || self.pinned(end_entity) {
            return Ok(ClientCertVerified::assertion());
        }
        match &self.client {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            None => Err(Self::untrusted()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Writes development certificates into `dir`: `ca.pem`/`ca.key`, and for each name
/// `<name>.pem`/`<name>.key` signed by that CA, valid for the name, `localhost`,
/// 127.0.0.1, ::1 and every entry of `sans`, for both server and client use. Returns the
/// files written.
pub fn make_dev_certs(
    dir: &Path,
    names: &[String],
    sans: &[String],
) -> anyhow::Result<Vec<PathBuf>> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut write = |name: String, text: String| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Braid development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).context("signing the CA")?;
    write("ca.pem".into(), ca.pem())?;
    write("ca.key".into(), ca_key.serialize_pem())?;
    for name in names {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            bail!("certificate name {name:?}: use letters, digits, '-' and '.'");
        }
        let mut alt = vec![
            name.clone(),
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ];
        alt.extend(sans.iter().cloned());
        let mut params = CertificateParams::new(alt).context("certificate names")?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.as_str());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().context("generating a key")?;
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .with_context(|| format!("signing {name}"))?;
        write(format!("{name}.pem"), cert.pem())?;
        write(format!("{name}.key"), key.serialize_pem())?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_with_or_without_colons_and_refuse_garbage() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_pin(&hex).unwrap(), [0xab; 32]);
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(parse_pin(&colons.join(":")).unwrap(), [0xab; 32]);
        assert!(parse_pin("abcd").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
        assert!(
            parse_pin(&format!("a{}b", "é".repeat(31))).is_err(),
            "no panic"
        );
    }

    #[test]
    fn cert_without_key_is_refused() {
        let t = Tls {
            cert: Some("a.pem".into()),
            ..Tls::default()
        };
        assert!(t.validate().unwrap_err().contains("cert and key"));
    }

    #[test]
    fn dev_certs_load_as_server_and_client() {
        let dir = std::env::temp_dir().join(format!("braid-tls-{}", std::process::id()));
        make_dev_certs(&dir, &["node-a".into()], &[]).unwrap();
        let tls = Tls {
            cert: Some(dir.join("node-a.pem")),
            key: Some(dir.join("node-a.key")),
            ca: Some(dir.join("ca.pem")),
            ..Tls::default()
        };
        assert!(tls.server_config().unwrap().is_some());
        tls.client_config().unwrap();
        assert_eq!(fingerprint_file(&dir.join("node-a.pem")).unwrap().len(), 64);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A returning client resumes its session, however many clients came since: 300
    /// clients (over the 256 sessions rustls keeps by default) each connect, then each
    /// again, and every second handshake is a resumption.
    #[test]
    fn every_returning_client_resumes_however_many_came_between() {
        let dir = std::env::temp_dir().join(format!("braid-tickets-{}", std::process::id()));
        make_dev_certs(&dir, &["edge".into()], &[]).unwrap();
        let server = Tls {
            cert: Some(dir.join("edge.pem")),
            key: Some(dir.join("edge.key")),
            ..Tls::default()
        };
        let server = Arc::new(server.server_config().unwrap().expect("a server"));
        let viewer = Tls {
            ca: Some(dir.join("ca.pem")),
            ..Tls::default()
        };
        let clients: Vec<Arc<rustls::ClientConfig>> = (0..300)
            .map(|_| Arc::new(viewer.client_config().unwrap()))
            .collect();
        for c in &clients {
            assert_eq!(
                handshake_in_memory(c, &server).0,
                rustls::HandshakeKind::Full
            );
        }
        let resumed = clients
            .iter()
            .filter(|c| handshake_in_memory(c, &server).0 == rustls::HandshakeKind::Resumed)
            .count();
        assert_eq!(resumed, 300, "returning clients resumed");
        let _ = std::fs::remove_dir_all(dir);
    }
}
