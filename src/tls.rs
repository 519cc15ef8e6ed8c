//! TLS 1.3 configuration for citycard: mutual TLS with terminal client certificates issued by
//! the citycard CA, ring as the only crypto provider.
//!
//! The server config requires and verifies a client certificate (EKU ClientAuth, chain to
//! `ca.pem`, optional CRL). With TLS 1.3 a client's handshake can complete before the server
//! has rejected its certificate, so callers judge success on the server's `accept()`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::identity::{Role, TerminalId};
use crate::keys::KeysError;

/// The single ALPN protocol spoken by citycard.
pub const ALPN: &[u8] = b"citycard/1";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_err(path: &Path) -> impl FnOnce(rustls_pki_types::pem::Error) -> KeysError + '_ {
    move |source| KeysError::Pem { path: path.to_path_buf(), source }
}

/// All certificates in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, KeysError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(path))?;
    if certs.is_empty() {
        return Err(pem_err(path)(rustls_pki_types::pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, KeysError> {
    PrivateKeyDer::from_pem_file(path).map_err(pem_err(path))
}

fn load_roots(ca_pem: &Path) -> Result<Arc<RootCertStore>, KeysError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// Largest CRL file the server reads: a revoked entry is about 40 bytes, so 16 MiB holds some
/// 400,000 revocations, far beyond a city's terminal fleet, and bounds what a bad file costs.
pub const MAX_CRL_BYTES: u64 = 16 * 1024 * 1024;

/// A CRL that was read, parsed and checked against the CA: signed by `ca.pem`, issued in its
/// name. `revoked` holds the canonical serial hex ([`crate::keys::serial_hex`]) of every entry
/// so live connections can be matched against it.
#[derive(Clone, Debug)]
pub struct Crl {
    ders: Vec<CertificateRevocationListDer<'static>>,
    pub revoked: std::collections::HashSet<String>,
}

/// Reads the CRL(s) in the PEM file `path` and checks each against `keys_dir/ca.pem`: a CRL
/// from another CA would make every terminal's revocation status unknown and lock the whole
/// fleet out, so it is refused here with a clear error instead.
pub fn load_crl(keys_dir: &Path, path: &Path) -> Result<Crl, KeysError> {
    let bad = |reason: String| KeysError::Format { path: path.to_path_buf(), reason };
    let len = std::fs::metadata(path)
        .map_err(|source| KeysError::Io { path: path.to_path_buf(), source })?
        .len();
    if len > MAX_CRL_BYTES {
        return Err(bad(format!("{len} bytes is more than the limit of {MAX_CRL_BYTES}")));
    }
    let ders = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(pem_err(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(path))?;
    if ders.is_empty() {
        return Err(pem_err(path)(rustls_pki_types::pem::Error::NoItemsFound));
    }
    let ca_der = load_certs(&keys_dir.join(crate::keys::CA_CERT))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der[0].as_ref())
        .map_err(|e| bad(format!("CA certificate does not parse: {e}")))?;
    let mut revoked = std::collections::HashSet::new();
    for der in &ders {
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| bad(format!("not a CRL: {e}")))?;
        if crl.issuer().as_raw() != ca.subject().as_raw() {
            return Err(bad(format!("issued by {}, not by the CA {}", crl.issuer(), ca.subject())));
        }
        crl.verify_signature(ca.public_key())
            .map_err(|e| bad(format!("signature does not verify with the CA key: {e}")))?;
        for entry in crl.iter_revoked_certificates() {
            revoked.insert(crate::keys::serial_hex(entry.raw_serial()));
        }
    }
    Ok(Crl { ders, revoked })
}

/// What the server keeps about a verified peer or its own certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateFacts {
    /// Canonical serial hex, as in `revoked.txt`.
    pub serial_hex: String,
    /// End of validity, Unix seconds.
    pub not_after_unix_secs: i64,
}

pub fn certificate_facts(cert: &CertificateDer<'_>) -> Result<CertificateFacts, KeysError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| KeysError::PeerIdentity(format!("unparsable certificate: {e}")))?;
    Ok(CertificateFacts {
        serial_hex: crate::keys::serial_hex(x509.raw_serial()),
        not_after_unix_secs: x509.validity().not_after.timestamp(),
    })
}

/// Server config: TLS 1.3 only, client certificate required and verified against
/// `keys_dir/ca.pem` (and against `crl` when given; a certificate whose status the CRL cannot
/// tell is refused), server identity from `server.pem` / `server.key`, ALPN `citycard/1`,
/// no 0-RTT, no session resumption (no tickets, no session cache), no key log.
pub fn server_config(keys_dir: &Path, crl: Option<&Path>) -> Result<Arc<ServerConfig>, KeysError> {
    let crl = crl.map(|path| load_crl(keys_dir, path)).transpose()?;
    server_config_with(keys_dir, crl.as_ref(), Some(ALPN))
}

/// [`server_config`] from an already checked CRL. `alpn` is the one protocol offered (the
/// terminal listener's `citycard/1`), or None for the admin listener, which speaks HTTP/1.1
/// to any scraper.
pub fn server_config_with(
    keys_dir: &Path,
    crl: Option<&Crl>,
    alpn: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, KeysError> {
    let provider = provider();
    let roots = load_roots(&keys_dir.join(crate::keys::CA_CERT))?;
    let mut verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    if let Some(crl) = crl {
        verifier = verifier.with_crls(crl.ders.clone());
    }
    let verifier = verifier.build()?;

    let certs = load_certs(&keys_dir.join(crate::keys::SERVER_CERT))?;
    let key = load_private_key(&keys_dir.join(crate::keys::SERVER_KEY))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.map(|p| vec![p.to_vec()]).unwrap_or_default();
    config.max_early_data_size = 0;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.key_log = Arc::new(rustls::NoKeyLog {});
    Ok(Arc::new(config))
}

/// Client config for terminal `terminal`: trusts `keys_dir/ca.pem` and presents
/// `keys_dir/terminals/<terminal>.pem` / `.key`. TLS 1.3 only, ALPN `citycard/1`.
pub fn client_config(keys_dir: &Path, terminal: &str) -> Result<Arc<ClientConfig>, KeysError> {
    let id = TerminalId::new(terminal)?;
    let (cert, key) = crate::keys::terminal_paths(keys_dir, &id);
    client_config_from_files(&keys_dir.join(crate::keys::CA_CERT), Some((&cert, &key)))
}

/// Client config from explicit files: trusts the CA certificates in `ca_pem` and presents
/// `identity` = (certificate chain PEM, private key PEM), or no certificate when `None`.
pub fn client_config_from_files(
    ca_pem: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, KeysError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(load_roots(ca_pem)?);
    let mut config = match identity {
        Some((cert, key)) => {
            builder.with_client_auth_cert(load_certs(cert)?, load_private_key(key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

/// The terminal identity of an established server-side connection: the verified leaf
/// certificate's subject CN (terminal id) and OU (role).
pub fn peer_identity(conn: &ServerConnection) -> Result<(TerminalId, Role), KeysError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or_else(|| KeysError::PeerIdentity("no client certificate".into()))?;
    identity_from_cert(leaf)
}

/// Parses a (verified) terminal certificate: exactly one subject CN, a valid [`TerminalId`],
/// and exactly one subject OU, a valid [`Role`]. As a second line of defence the certificate
/// must carry EKU ClientAuth.
pub fn identity_from_cert(cert: &CertificateDer<'_>) -> Result<(TerminalId, Role), KeysError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| KeysError::PeerIdentity(format!("unparsable certificate: {e}")))?;

    let eku = x509
        .extended_key_usage()
        .map_err(|e| KeysError::PeerIdentity(format!("bad extended key usage: {e}")))?;
    if !eku.is_some_and(|eku| eku.value.client_auth) {
        return Err(KeysError::PeerIdentity("certificate lacks EKU clientAuth".into()));
    }

    let subject = x509.subject();
    let single = |mut values: Vec<&x509_parser::x509::AttributeTypeAndValue<'_>>,
                  what: &str|
     -> Result<String, KeysError> {
        match (values.pop(), values.is_empty()) {
            (Some(v), true) => v
                .as_str()
                .map(str::to_owned)
                .map_err(|_| KeysError::PeerIdentity(format!("subject {what} is not a string"))),
            (None, _) => Err(KeysError::PeerIdentity(format!("subject has no {what}"))),
            (Some(_), false) => {
                Err(KeysError::PeerIdentity(format!("subject has more than one {what}")))
            }
        }
    };
    let cn = single(subject.iter_common_name().collect(), "CN")?;
    let ou = single(subject.iter_organizational_unit().collect(), "OU")?;
    let id =
        TerminalId::new(cn).map_err(|e| KeysError::PeerIdentity(format!("subject CN: {e}")))?;
    let role =
        ou.parse::<Role>().map_err(|e| KeysError::PeerIdentity(format!("subject OU: {e}")))?;
    Ok((id, role))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{self, TerminalCertOptions};
    use std::path::PathBuf;
    use std::time::{Duration, SystemTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const TIMEOUT: Duration = Duration::from_secs(10);

    struct Outcome {
        /// What the server saw: the identity, or the accept()/identity error (Debug text).
        server: Result<(TerminalId, Role), String>,
        /// What the client saw: the server's greeting, or an error.
        client: Result<Vec<u8>, String>,
    }

    /// One connection on 127.0.0.1: the server accepts, reads the identity, checks the ALPN
    /// and writes "ok"; the client connects and reads two bytes.
    async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(server);
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| format!("tcp accept: {e}"))?;
            let mut tls = acceptor.accept(tcp).await.map_err(|e| {
                // The rustls error is inside the io::Error.
                match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                    Some(tls_err) => format!("{tls_err:?}"),
                    None => format!("{e:?}"),
                }
            })?;
            let (_, conn) = tls.get_ref();
            if conn.alpn_protocol() != Some(ALPN) {
                return Err(format!("alpn {:?}", conn.alpn_protocol()));
            }
            let identity = peer_identity(conn).map_err(|e| format!("{e:?}"))?;
            tls.write_all(b"ok").await.map_err(|e| format!("write: {e}"))?;
            tls.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            Ok(identity)
        });

        let client = async move {
            let connector = TlsConnector::from(client);
            let tcp = TcpStream::connect(addr).await.map_err(|e| format!("tcp: {e}"))?;
            let name = rustls_pki_types::ServerName::try_from("localhost")
                .map_err(|e| format!("name: {e}"))?;
            let mut tls =
                connector.connect(name, tcp).await.map_err(|e| format!("connect: {e}"))?;
            let mut buf = vec![0u8; 2];
            tls.read_exact(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            Ok::<_, String>(buf)
        };
        let client = tokio::time::timeout(TIMEOUT, client)
            .await
            .unwrap_or_else(|_| Err("client timed out".into()));
        let server = match tokio::time::timeout(TIMEOUT, server_task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(format!("server task: {join}")),
            Err(_) => Err("server timed out".into()),
        };
        Outcome { server, client }
    }

    fn assert_refused(outcome: &Outcome, reason: &str) {
        match &outcome.server {
            Ok(id) => panic!("server accepted {id:?}, expected refusal ({reason})"),
            Err(e) => assert!(e.contains(reason), "server error {e:?} lacks {reason:?}"),
        }
        assert!(outcome.client.is_err(), "client read succeeded: {:?}", outcome.client);
    }

    fn init_dir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        keys::init(&dir).expect("init");
        (tmp, dir)
    }

    #[tokio::test]
    async fn mutual_tls_handshake_yields_terminal_identity() {
        let (_tmp, dir) = init_dir();
        let server = server_config(&dir, None).expect("server config");
        for (name, role) in keys::INITIAL_TERMINALS {
            let client = client_config(&dir, name).expect("client config");
            let outcome = handshake(server.clone(), client).await;
            let id = TerminalId::new(name).expect("id");
            assert_eq!(outcome.server.expect("server accepts"), (id, role));
            assert_eq!(outcome.client.expect("client reads"), b"ok");
        }
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let (_tmp, dir) = init_dir();
        let server = server_config(&dir, None).expect("server config");
        let client =
            client_config_from_files(&dir.join(keys::CA_CERT), None).expect("client config");
        assert_refused(&handshake(server, client).await, "NoCertificatesPresented");
    }

    #[tokio::test]
    async fn certificate_from_another_ca_is_refused() {
        let (_tmp, dir) = init_dir();
        let (_tmp2, other) = init_dir();
        let server = server_config(&dir, None).expect("server config");
        // Trusts the right server CA but presents a terminal cert from the other CA.
        let client = client_config_from_files(
            &dir.join(keys::CA_CERT),
            Some((&other.join("terminals/reader-1.pem"), &other.join("terminals/reader-1.key"))),
        )
        .expect("client config");
        assert_refused(&handshake(server, client).await, "UnknownIssuer");
    }

    #[tokio::test]
    async fn expired_certificate_is_refused() {
        let (_tmp, dir) = init_dir();
        let id = TerminalId::new("reader-old").expect("id");
        let day = Duration::from_secs(86_400);
        let opts = TerminalCertOptions {
            not_before: SystemTime::now() - 30 * day,
            not_after: SystemTime::now() - day,
            server_auth_only: false,
        };
        keys::issue_terminal_with(&dir, &id, Role::Reader, opts).expect("issue");
        let server = server_config(&dir, None).expect("server config");
        let client = client_config(&dir, "reader-old").expect("client config");
        assert_refused(&handshake(server, client).await, "Expired");
    }

    #[tokio::test]
    async fn server_auth_only_certificate_is_refused() {
        let (_tmp, dir) = init_dir();
        let id = TerminalId::new("kiosk-srv").expect("id");
        let opts = TerminalCertOptions {
            server_auth_only: true,
            ..TerminalCertOptions::standard().expect("opts")
        };
        keys::issue_terminal_with(&dir, &id, Role::Kiosk, opts).expect("issue");
        let server = server_config(&dir, None).expect("server config");
        let client = client_config(&dir, "kiosk-srv").expect("client config");
        assert_refused(&handshake(server, client).await, "InvalidPurpose");
        // And the identity parser refuses it on its own too.
        let der = load_certs(&dir.join("terminals/kiosk-srv.pem")).expect("cert");
        assert!(identity_from_cert(&der[0]).is_err());
    }

    #[tokio::test]
    async fn revoked_certificate_is_refused_once_crl_is_configured() {
        let (_tmp, dir) = init_dir();
        let id = TerminalId::new("counter-7").expect("id");
        keys::issue_terminal(&dir, &id, Role::Counter).expect("issue");

        let before = server_config(&dir, None).expect("server config");
        let client = client_config(&dir, "counter-7").expect("client config");
        let outcome = handshake(before, client.clone()).await;
        assert_eq!(
            outcome.server.expect("accepted before revocation"),
            (id.clone(), Role::Counter)
        );

        let crl = keys::revoke(&dir, &id).expect("revoke");
        let after = server_config(&dir, Some(&crl)).expect("server config with CRL");
        assert_refused(&handshake(after.clone(), client).await, "Revoked");

        // Terminals that were not revoked still get in.
        let other = client_config(&dir, "counter-1").expect("client config");
        let outcome = handshake(after, other).await;
        let counter1 = TerminalId::new("counter-1").expect("id");
        assert_eq!(outcome.server.expect("not revoked"), (counter1, Role::Counter));
    }

    #[tokio::test]
    async fn client_with_wrong_alpn_is_refused() {
        let (_tmp, dir) = init_dir();
        let server = server_config(&dir, None).expect("server config");
        let mut client = (*client_config(&dir, "reader-1").expect("client config")).clone();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        assert_refused(&handshake(server, Arc::new(client)).await, "NoApplicationProtocol");
    }

    #[test]
    fn configs_fail_cleanly_on_missing_or_bad_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let err = server_config(dir, None).expect_err("no files");
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert!(client_config(dir, "reader-1").is_err());
        assert!(matches!(
            client_config(dir, "../etc/passwd"),
            Err(KeysError::InvalidTerminalId(_))
        ));

        keys::init(dir).expect("init");
        std::fs::write(dir.join("empty.pem"), b"").expect("write");
        assert!(server_config(dir, Some(&dir.join("empty.pem"))).is_err());
        assert!(server_config(dir, Some(&dir.join("missing.pem"))).is_err());
        std::fs::write(dir.join("server.key"), b"garbage").ok();
        // server.key is 0600 and writable by us; garbage in it must be an error, not a panic.
        assert!(server_config(dir, None).is_err());
    }

    #[test]
    fn identity_requires_cn_and_ou() {
        let make = |cn: Option<&str>, ou: Option<&str>| {
            let mut params = rcgen::CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            if let Some(cn) = cn {
                params.distinguished_name.push(rcgen::DnType::CommonName, cn);
            }
            if let Some(ou) = ou {
                params.distinguished_name.push(rcgen::DnType::OrganizationalUnitName, ou);
            }
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let key = rcgen::KeyPair::generate().expect("key");
            params.self_signed(&key).expect("cert").der().clone()
        };
        let ok = identity_from_cert(&make(Some("reader-5"), Some("reader"))).expect("ok");
        assert_eq!(ok, (TerminalId::new("reader-5").expect("id"), Role::Reader));
        for (cn, ou) in [
            (None, Some("reader")),
            (Some("reader-5"), None),
            (Some("bad id"), Some("reader")),
            (Some("reader-5"), Some("admin")),
            (Some(""), Some("kiosk")),
        ] {
            let cert = make(cn, ou);
            assert!(
                matches!(identity_from_cert(&cert), Err(KeysError::PeerIdentity(_))),
                "{cn:?} {ou:?}"
            );
        }
        assert!(identity_from_cert(&CertificateDer::from(vec![0u8; 10])).is_err());
    }
}
