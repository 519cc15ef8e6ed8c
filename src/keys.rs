//! Key material for citycard: the development CA, the server certificate, terminal client
//! certificates, the CRL, the card issuer master keys and the Ed25519 assertion key.
//!
//! Layout of a keys directory (all written by [`init`] unless noted):
//!
//! | file | content |
//! | --- | --- |
//! | `ca.pem` / `ca.key` | development CA (ECDSA P-256), PEM `CERTIFICATE` / PKCS#8 `PRIVATE KEY` |
//! | `server.pem` / `server.key` | server cert for DNS `localhost` and IP `127.0.0.1`, EKU ServerAuth |
//! | `issuer.key` | card issuer master keys, one line per version: `<version> <64 hex chars>` |
//! | `assertion.key` | Ed25519 PKCS#8 v2, PEM `PRIVATE KEY` |
//! | `assertion.pub` | raw 32-byte Ed25519 public key as 64 lowercase hex chars and a newline |
//! | `terminals/<id>.pem` / `.key` | terminal client cert (CN = id, OU = role, EKU ClientAuth) |
//! | `revoked.txt` | written by [`revoke`]: `<serial hex> <revoked at, unix secs> <terminal id>` |
//! | `crl.pem` | written by [`revoke`]: PEM `X509 CRL` signed by the CA |
//!
//! Every `*.key` file is created with mode 0600 and is never overwritten.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::time::ASN1Time;

/// File names inside a keys directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";
pub const ISSUER_KEYS: &str = "issuer.key";
pub const ASSERTION_KEY: &str = "assertion.key";
pub const ASSERTION_PUB: &str = "assertion.pub";
pub const TERMINALS_DIR: &str = "terminals";
pub const CRL: &str = "crl.pem";
pub const REVOKED_LIST: &str = "revoked.txt";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const MODE_SECRET: u32 = 0o600;
const MODE_PUBLIC: u32 = 0o644;
const MODE_DIR: u32 = 0o700;

/// Errors from key generation, loading and TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing to overwrite existing file {}", .0.display())]
    AlreadyExists(PathBuf),
    #[error("invalid terminal id {0:?}: must be 1 to 32 bytes of A-Z, a-z, 0-9, '.', '_' or '-'")]
    InvalidTerminalId(String),
    #[error("invalid terminal role {0:?}: expected reader, kiosk, counter or monitor")]
    InvalidRole(String),
    #[error("{}: PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate parsing: {0}")]
    X509(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("peer identity: {0}")]
    PeerIdentity(String),
    #[error("crypto: {0}")]
    Crypto(String),
    #[error("invalid certificate validity: {0}")]
    Validity(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeysError + '_ {
    move |source| KeysError::Io { path: path.to_path_buf(), source }
}

fn pem_err(path: &Path) -> impl FnOnce(rustls_pki_types::pem::Error) -> KeysError + '_ {
    move |source| KeysError::Pem { path: path.to_path_buf(), source }
}

fn format_err(path: &Path, reason: impl Into<String>) -> KeysError {
    KeysError::Format { path: path.to_path_buf(), reason: reason.into() }
}

pub use crate::identity::{Role, TerminalId};

/// Paths of a terminal's certificate and key inside a keys directory.
pub fn terminal_paths(dir: &Path, id: &TerminalId) -> (PathBuf, PathBuf) {
    let terminals = dir.join(TERMINALS_DIR);
    (terminals.join(format!("{id}.pem")), terminals.join(format!("{id}.key")))
}

// ---------------------------------------------------------------------------------------------
// Small helpers: randomness, hex, time, file writing

fn random_bytes<const N: usize>() -> Result<[u8; N], KeysError> {
    let mut buf = [0u8; N];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| KeysError::Crypto("system random number generator failed".into()))?;
    Ok(buf)
}

fn to_hex(bytes: &[u8]) -> String {
    crate::hex::encode(bytes)
}

fn from_hex32(s: &str) -> Option<[u8; 32]> {
    crate::hex::decode(s)?.try_into().ok()
}

/// A random, positive, 16-byte serial number whose first byte is non-zero (so its DER
/// encoding is exactly these bytes and its hex form is canonical).
fn random_serial() -> Result<SerialNumber, KeysError> {
    let mut bytes = random_bytes::<16>()?;
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 1;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

/// Canonical hex of a DER INTEGER's content bytes (leading zero bytes removed).
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    to_hex(&raw[start..])
}

fn unix_secs(t: SystemTime) -> Result<i64, KeysError> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()),
        Err(e) => i64::try_from(e.duration().as_secs()).map(|s| -s),
    };
    secs.map_err(|_| KeysError::Validity(format!("time out of range: {t:?}")))
}

/// Converts to the date-time type rcgen uses (the `time` crate's, reached through
/// x509-parser so that this module needs no direct `time` dependency).
fn asn1_time(t: SystemTime) -> Result<ASN1Time, KeysError> {
    // Certificates cannot encode years past 9999.
    const MAX_SECS: i64 = 253_402_300_799;
    let secs = unix_secs(t)?;
    if !(0..=MAX_SECS).contains(&secs) {
        return Err(KeysError::Validity(format!("time {secs} (unix seconds) outside 1970..=9999")));
    }
    ASN1Time::from_timestamp(secs).map_err(|e| KeysError::Validity(e.to_string()))
}

fn now_plus(delta: Duration) -> Result<SystemTime, KeysError> {
    SystemTime::now().checked_add(delta).ok_or_else(|| KeysError::Validity("time overflow".into()))
}

fn now_minus(delta: Duration) -> Result<SystemTime, KeysError> {
    SystemTime::now().checked_sub(delta).ok_or_else(|| KeysError::Validity("time underflow".into()))
}

fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), KeysError> {
    if not_after <= not_before {
        return Err(KeysError::Validity("not_after must be later than not_before".into()));
    }
    params.not_before = asn1_time(not_before)?.to_datetime();
    params.not_after = asn1_time(not_after)?.to_datetime();
    Ok(())
}

fn create_dir_private(path: &Path) -> Result<(), KeysError> {
    DirBuilder::new().recursive(true).mode(MODE_DIR).create(path).map_err(io_err(path))
}

fn sync_dir(path: &Path) -> Result<(), KeysError> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io_err(path))
}

fn mode_for(path: &Path) -> u32 {
    if path.extension().is_some_and(|e| e == "key") {
        MODE_SECRET
    } else {
        MODE_PUBLIC
    }
}

/// Creates `path` (which must not exist) with `mode`, writes and fsyncs it. A file that this
/// call created but could not fill is removed again.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeysError> {
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                KeysError::AlreadyExists(path.to_path_buf())
            } else {
                io_err(path)(e)
            }
        })?;
    if let Err(e) = file.write_all(contents).and_then(|()| file.sync_all()) {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(io_err(path)(e));
    }
    Ok(())
}

fn exists(path: &Path) -> bool {
    // symlink_metadata also sees dangling symlinks, which create_new would refuse.
    path.symlink_metadata().is_ok()
}

/// Writes a set of new files all-or-nothing: first checks that none exists, then creates
/// each with `create_new` (mode 0600 for `*.key`), removing the ones already written if a
/// later one fails.
fn write_all_new(files: &[(PathBuf, Vec<u8>)]) -> Result<Vec<PathBuf>, KeysError> {
    if let Some((path, _)) = files.iter().find(|(p, _)| exists(p)) {
        return Err(KeysError::AlreadyExists(path.clone()));
    }
    let mut written: Vec<PathBuf> = Vec::with_capacity(files.len());
    for (path, contents) in files {
        if let Err(e) = write_new(path, contents, mode_for(path)) {
            for p in &written {
                let _ = fs::remove_file(p);
            }
            return Err(e);
        }
        written.push(path.clone());
    }
    let mut dirs: Vec<&Path> = written.iter().filter_map(|p| p.parent()).collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        sync_dir(d)?;
    }
    Ok(written)
}

/// Replaces `target` atomically: creates `<target>.tmp` with `create_new` (which doubles as a
/// lock against a concurrent writer), calls `build` to compute the new contents (it should
/// read the current state only now), writes and fsyncs the temp file, renames it over the
/// target and fsyncs the directory. On error the temp file is removed.
fn atomic_replace(
    target: &Path,
    mode: u32,
    build: impl FnOnce() -> Result<Vec<u8>, KeysError>,
) -> Result<(), KeysError> {
    let file_name = target.file_name().ok_or_else(|| format_err(target, "not a file path"))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = target.with_file_name(tmp_name);
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                format_err(
                    &tmp,
                    "exists: another update is in progress, or a crashed one left it (remove it)",
                )
            } else {
                io_err(&tmp)(e)
            }
        })?;
    let result = build().and_then(|contents| {
        file.write_all(&contents).and_then(|()| file.sync_all()).map_err(io_err(&tmp))?;
        fs::rename(&tmp, target).map_err(io_err(target))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => Ok(()),
    }
}

fn read_string(path: &Path) -> Result<String, KeysError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "secret key file is accessible by group or others; expected 0600"
            );
        }
    }
}

fn parse_x509(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, KeysError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| KeysError::X509(e.to_string()))?;
    Ok(cert)
}

fn load_first_cert(path: &Path) -> Result<CertificateDer<'static>, KeysError> {
    CertificateDer::from_pem_file(path).map_err(pem_err(path))
}

// ---------------------------------------------------------------------------------------------
// Certificate generation

fn ca_params() -> Result<CertificateParams, KeysError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    // A random suffix keeps CAs from different `init` runs apart by name, so a certificate
    // from another CA fails as "unknown issuer" rather than as a bad signature.
    let suffix = to_hex(&random_bytes::<4>()?);
    params.distinguished_name.push(DnType::CommonName, format!("citycard development CA {suffix}"));
    params.distinguished_name.push(DnType::OrganizationName, "citycard");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, now_minus(DAY)?, now_plus(10 * 365 * DAY)?)?;
    Ok(params)
}

fn server_params() -> Result<CertificateParams, KeysError> {
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, now_minus(DAY)?, now_plus(2 * 365 * DAY)?)?;
    Ok(params)
}

/// Options for [`issue_terminal_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TerminalCertOptions {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Issue a certificate whose only EKU is ServerAuth instead of ClientAuth (the server
    /// must refuse it; for tests).
    pub server_auth_only: bool,
}

impl TerminalCertOptions {
    /// Valid from one day ago until two years from now, EKU ClientAuth.
    pub fn standard() -> Result<Self, KeysError> {
        Ok(TerminalCertOptions {
            not_before: now_minus(DAY)?,
            not_after: now_plus(2 * 365 * DAY)?,
            server_auth_only: false,
        })
    }
}

fn terminal_params(
    id: &TerminalId,
    role: Role,
    opts: &TerminalCertOptions,
) -> Result<CertificateParams, KeysError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, id.as_str());
    params.distinguished_name.push(DnType::OrganizationalUnitName, role.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if opts.server_auth_only {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, opts.not_before, opts.not_after)?;
    Ok(params)
}

/// Signs a fresh leaf key pair; returns (certificate PEM, private key PEM).
fn sign_leaf(
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), KeysError> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn terminal_files(
    dir: &Path,
    issuer: &Issuer<'_, KeyPair>,
    id: &TerminalId,
    role: Role,
    opts: &TerminalCertOptions,
) -> Result<[(PathBuf, Vec<u8>); 2], KeysError> {
    let (cert_path, key_path) = terminal_paths(dir, id);
    let (cert_pem, key_pem) = sign_leaf(&terminal_params(id, role, opts)?, issuer)?;
    Ok([(cert_path, cert_pem.into_bytes()), (key_path, key_pem.into_bytes())])
}

/// Loads the CA from `ca.pem` / `ca.key` as an rcgen issuer, checking that they match.
fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, KeysError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let cert_pem = read_string(&cert_path)?;
    let key_pem = read_string(&key_path)?;
    warn_if_readable_by_others(&key_path);
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| format_err(&key_path, format!("not a usable private key: {e}")))?;

    let der = load_first_cert(&cert_path)?;
    let cert = parse_x509(&der)?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(format_err(&key_path, format!("does not match {CA_CERT}")));
    }
    Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(|e| format_err(&cert_path, format!("not a usable CA certificate: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Public operations

/// True when `dir` already holds a CA certificate (`serve` generates dev keys otherwise).
pub fn has_keys(dir: &Path) -> bool {
    dir.join(CA_CERT).exists()
}

/// The terminals that [`init`] issues.
pub const INITIAL_TERMINALS: [(&str, Role); 3] =
    [("reader-1", Role::Reader), ("kiosk-1", Role::Kiosk), ("counter-1", Role::Counter)];

/// Generates a complete development key set in `dir` (created with mode 0700 if missing).
///
/// Refuses, writing nothing, if any target file already exists. Returns the files written.
pub fn init(dir: &Path) -> Result<Vec<PathBuf>, KeysError> {
    let mut targets: Vec<PathBuf> =
        [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, ISSUER_KEYS, ASSERTION_KEY, ASSERTION_PUB]
            .iter()
            .map(|name| dir.join(name))
            .collect();
    let terminals: Vec<(TerminalId, Role)> = INITIAL_TERMINALS
        .iter()
        .map(|(id, role)| Ok((TerminalId::new(*id)?, *role)))
        .collect::<Result<_, KeysError>>()?;
    for (id, _) in &terminals {
        let (cert, key) = terminal_paths(dir, id);
        targets.push(cert);
        targets.push(key);
    }
    // Check everything before generating anything (write_all_new checks again).
    if let Some(existing) = targets.iter().find(|p| exists(p)) {
        return Err(KeysError::AlreadyExists(existing.clone()));
    }

    // CA.
    let ca_key = KeyPair::generate()?;
    let ca_params = ca_params()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    // Server.
    let (server_pem, server_key_pem) = sign_leaf(&server_params()?, &issuer)?;

    // Card issuer master key, version 1.
    let issuer_key_line = format!("1 {}\n", to_hex(&random_bytes::<32>()?));

    // Assertion key.
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| KeysError::Crypto("Ed25519 key generation failed".into()))?;
    let assertion = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| KeysError::Crypto(format!("Ed25519 key rejected: {e}")))?;
    let assertion_pub = format!("{}\n", to_hex(assertion.public_key().as_ref()));
    let assertion_pem = KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.as_ref()),
        &rcgen::PKCS_ED25519,
    )?
    .serialize_pem();

    let mut files: Vec<(PathBuf, Vec<u8>)> = vec![
        (dir.join(CA_CERT), ca_cert.pem().into_bytes()),
        (dir.join(CA_KEY), ca_key_pem.into_bytes()),
        (dir.join(SERVER_CERT), server_pem.into_bytes()),
        (dir.join(SERVER_KEY), server_key_pem.into_bytes()),
        (dir.join(ISSUER_KEYS), issuer_key_line.into_bytes()),
        (dir.join(ASSERTION_KEY), assertion_pem.into_bytes()),
        (dir.join(ASSERTION_PUB), assertion_pub.into_bytes()),
    ];
    let opts = TerminalCertOptions::standard()?;
    for (id, role) in &terminals {
        files.extend(terminal_files(dir, &issuer, id, *role, &opts)?);
    }

    create_dir_private(&dir.join(TERMINALS_DIR))?;
    let written = write_all_new(&files)?;
    tracing::info!(dir = %dir.display(), files = written.len(), "generated development keys");
    Ok(written)
}

/// Issues `terminals/<id>.pem` / `.key` with the standard options (EKU ClientAuth, valid
/// from one day ago for two years). Refuses to overwrite. Returns (cert path, key path).
pub fn issue_terminal(
    dir: &Path,
    id: &TerminalId,
    role: Role,
) -> Result<(PathBuf, PathBuf), KeysError> {
    issue_terminal_with(dir, id, role, TerminalCertOptions::standard()?)
}

/// [`issue_terminal`] with explicit validity and EKU choice.
pub fn issue_terminal_with(
    dir: &Path,
    id: &TerminalId,
    role: Role,
    opts: TerminalCertOptions,
) -> Result<(PathBuf, PathBuf), KeysError> {
    let (cert_path, key_path) = terminal_paths(dir, id);
    for p in [&cert_path, &key_path] {
        if exists(p) {
            return Err(KeysError::AlreadyExists(p.clone()));
        }
    }
    let issuer = load_ca(dir)?;
    let files = terminal_files(dir, &issuer, id, role, &opts)?;
    create_dir_private(&dir.join(TERMINALS_DIR))?;
    write_all_new(&files)?;
    tracing::info!(terminal = %id, role = %role, "issued terminal certificate");
    Ok((cert_path, key_path))
}

struct RevokedEntry {
    serial_hex: String,
    revoked_at: i64,
    rest: String,
}

fn parse_revoked(path: &Path, text: &str) -> Result<Vec<RevokedEntry>, KeysError> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: &str| format_err(path, format!("line {}: {what}", n + 1));
        let mut parts = line.split_whitespace();
        let serial = parts.next().ok_or_else(|| bad("empty"))?.to_ascii_lowercase();
        if crate::hex::decode(&serial).is_none_or(|b| b.is_empty() || b.len() > 20) {
            return Err(bad("serial is not 1 to 20 bytes of hex"));
        }
        let revoked_at = match parts.next() {
            Some(t) => t.parse::<i64>().map_err(|_| bad("bad revocation time"))?,
            None => unix_secs(SystemTime::now())?,
        };
        let rest = parts.collect::<Vec<_>>().join(" ");
        entries.push(RevokedEntry {
            serial_hex: serial_hex(&crate::hex::decode(&serial).unwrap_or_default()),
            revoked_at,
            rest,
        });
    }
    Ok(entries)
}

/// Revokes a terminal's certificate: adds its serial to `revoked.txt` and regenerates
/// `crl.pem` (signed by the CA) from the whole list. Revoking twice is harmless. Returns the
/// CRL path. A running server reads the CRL at start and again on SIGHUP
/// ([`crate::server::trust`]).
pub fn revoke(dir: &Path, id: &TerminalId) -> Result<PathBuf, KeysError> {
    let (cert_path, _) = terminal_paths(dir, id);
    let der = load_first_cert(&cert_path)?;
    let cert = parse_x509(&der)?;
    let serial = serial_hex(cert.raw_serial());

    let issuer = load_ca(dir)?;
    let ca_der = load_first_cert(&dir.join(CA_CERT))?;
    let ca = parse_x509(&ca_der)?;
    if cert.issuer().as_raw() != ca.subject().as_raw() {
        return Err(format_err(&cert_path, format!("was not issued by {CA_CERT}")));
    }

    let list_path = dir.join(REVOKED_LIST);
    let crl_path = dir.join(CRL);
    let mut crl_pem = String::new();
    atomic_replace(&list_path, MODE_PUBLIC, || {
        let text = match fs::read_to_string(&list_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(&list_path)(e)),
        };
        let mut entries = parse_revoked(&list_path, &text)?;
        let now = SystemTime::now();
        if entries.iter().any(|e| e.serial_hex == serial) {
            tracing::info!(terminal = %id, serial = %serial, "already revoked");
        } else {
            entries.push(RevokedEntry {
                serial_hex: serial.clone(),
                revoked_at: unix_secs(now)?,
                rest: id.to_string(),
            });
        }
        crl_pem = build_crl(&issuer, &entries, now)?;
        let mut out = String::new();
        for e in &entries {
            out.push_str(&format!("{} {} {}\n", e.serial_hex, e.revoked_at, e.rest));
        }
        Ok(out.into_bytes())
    })?;
    atomic_replace(&crl_path, MODE_PUBLIC, || Ok(crl_pem.into_bytes()))?;
    tracing::info!(terminal = %id, serial = %serial, crl = %crl_path.display(), "revoked");
    Ok(crl_path)
}

fn build_crl(
    issuer: &Issuer<'_, KeyPair>,
    entries: &[RevokedEntry],
    now: SystemTime,
) -> Result<String, KeysError> {
    let mut revoked_certs = Vec::with_capacity(entries.len());
    for e in entries {
        let at = ASN1Time::from_timestamp(e.revoked_at)
            .map_err(|err| KeysError::Validity(err.to_string()))?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(
                &crate::hex::decode(&e.serial_hex).unwrap_or_default(),
            ),
            revocation_time: at.to_datetime(),
            reason_code: None,
            invalidity_date: None,
        });
    }
    let now_secs = unix_secs(now)?;
    let crl_number = u64::try_from(now_secs)
        .map_err(|_| KeysError::Validity("clock before 1970".into()))?
        .to_be_bytes();
    let params = CertificateRevocationListParams {
        this_update: asn1_time(now)?.to_datetime(),
        // Not enforced by the server's verifier (rustls ignores CRL expiry by default).
        next_update: asn1_time(
            now.checked_add(365 * DAY)
                .ok_or_else(|| KeysError::Validity("time overflow".into()))?,
        )?
        .to_datetime(),
        crl_number: SerialNumber::from_slice(&crl_number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?.pem()?)
}

// ---------------------------------------------------------------------------------------------
// Card issuer master keys

/// Versioned 32-byte card issuer master keys from `issuer.key`.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuerKeys {
    keys: BTreeMap<u16, [u8; 32]>,
}

impl IssuerKeys {
    /// Parses `<version> <64 hex>` lines (blank lines and `#` comments are skipped). Versions
    /// must be 1..=65535 and unique; at least one key is required.
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        warn_if_readable_by_others(path);
        Self::parse(path, &read_string(path)?)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, KeysError> {
        let mut keys = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // Never echo the line itself: it holds key material.
            let bad = |what: &str| format_err(path, format!("line {}: {what}", n + 1));
            let mut parts = line.split_whitespace();
            let (Some(version), Some(hex), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad("expected `<version> <64 hex chars>`"));
            };
            let version: u16 = version
                .parse()
                .ok()
                .filter(|v| *v != 0)
                .ok_or_else(|| bad("version must be a number in 1..=65535"))?;
            let key = from_hex32(hex).ok_or_else(|| bad("key must be 64 hex characters"))?;
            if keys.insert(version, key).is_some() {
                return Err(bad(&format!("duplicate version {version}")));
            }
        }
        if keys.is_empty() {
            return Err(format_err(path, "no issuer key versions"));
        }
        Ok(IssuerKeys { keys })
    }

    /// The highest version (the one to use for new cards).
    pub fn current_version(&self) -> u16 {
        self.keys.keys().next_back().copied().unwrap_or(0)
    }

    /// The key of the highest version.
    pub fn current(&self) -> (u16, &[u8; 32]) {
        let v = self.current_version();
        match self.keys.get(&v) {
            Some(k) => (v, k),
            None => (0, &[0u8; 32]), // unreachable: load rejects an empty set
        }
    }

    pub fn key(&self, version: u16) -> Option<&[u8; 32]> {
        self.keys.get(&version)
    }

    /// All versions, ascending.
    pub fn versions(&self) -> impl Iterator<Item = u16> + '_ {
        self.keys.keys().copied()
    }
}

impl fmt::Debug for IssuerKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerKeys")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Appends a new random issuer key with version = highest + 1 to `dir/issuer.key`, keeping
/// every earlier line byte for byte (temp file + fsync + rename + directory fsync). Returns
/// the new version.
pub fn add_issuer_version(dir: &Path) -> Result<u16, KeysError> {
    let path = dir.join(ISSUER_KEYS);
    let mut new_version = 0;
    atomic_replace(&path, MODE_SECRET, || {
        let mut text = read_string(&path)?;
        let keys = IssuerKeys::parse(&path, &text)?;
        new_version = keys
            .current_version()
            .checked_add(1)
            .ok_or_else(|| format_err(&path, "issuer key version 65535 reached"))?;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{new_version} {}\n", to_hex(&random_bytes::<32>()?)));
        Ok(text.into_bytes())
    })?;
    tracing::info!(version = new_version, "added card issuer key version");
    Ok(new_version)
}

// ---------------------------------------------------------------------------------------------
// Assertion key

/// Loads the Ed25519 assertion signing key (PKCS#8 v2, PEM `PRIVATE KEY`).
pub fn load_assertion_key(path: &Path) -> Result<Ed25519KeyPair, KeysError> {
    warn_if_readable_by_others(path);
    match PrivateKeyDer::from_pem_file(path).map_err(pem_err(path))? {
        PrivateKeyDer::Pkcs8(der) => Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| format_err(path, format!("not an Ed25519 PKCS#8 v2 key: {e}"))),
        _ => Err(format_err(path, "expected a PKCS#8 \"PRIVATE KEY\"")),
    }
}

/// Loads `assertion.pub`: 64 hex characters (surrounding whitespace ignored).
pub fn load_assertion_public(path: &Path) -> Result<[u8; 32], KeysError> {
    from_hex32(read_string(path)?.trim())
        .ok_or_else(|| format_err(path, "expected 64 hex characters"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).expect("read_dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let data = fs::read(&path).expect("read");
                    out.insert(path, data);
                }
            }
        }
        out
    }

    #[test]
    fn init_writes_everything_with_private_key_modes_and_refuses_second_run() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("keys");
        let written = init(&dir).expect("init");
        assert_eq!(written.len(), 13);
        for name in [
            "ca.pem",
            "ca.key",
            "server.pem",
            "server.key",
            "issuer.key",
            "assertion.key",
            "assertion.pub",
            "terminals/reader-1.pem",
            "terminals/reader-1.key",
            "terminals/kiosk-1.pem",
            "terminals/kiosk-1.key",
            "terminals/counter-1.pem",
            "terminals/counter-1.key",
        ] {
            let path = dir.join(name);
            assert!(written.contains(&path), "{name} not reported");
            let mode = fs::metadata(&path).expect("metadata").permissions().mode() & 0o777;
            if name.ends_with(".key") {
                assert_eq!(mode, 0o600, "{name} mode {mode:o}");
            } else {
                assert_eq!(mode & 0o077 & !0o044, 0, "{name} mode {mode:o}");
            }
        }
        assert!(has_keys(&dir));

        // Contents are usable.
        let issuer = IssuerKeys::load(&dir.join(ISSUER_KEYS)).expect("issuer keys");
        assert_eq!(issuer.current_version(), 1);
        let assertion = load_assertion_key(&dir.join(ASSERTION_KEY)).expect("assertion key");
        let public = load_assertion_public(&dir.join(ASSERTION_PUB)).expect("assertion pub");
        assert_eq!(assertion.public_key().as_ref(), &public);
        let pub_text = fs::read_to_string(dir.join(ASSERTION_PUB)).expect("read");
        assert_eq!(pub_text.len(), 65);
        assert!(pub_text.ends_with('\n'));
        let signature = assertion.sign(b"hello");
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public)
            .verify(b"hello", signature.as_ref())
            .expect("signature verifies");
        let key_pem = fs::read_to_string(dir.join(ASSERTION_KEY)).expect("read");
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));

        let server = load_first_cert(&dir.join(SERVER_CERT)).expect("server cert");
        let server = parse_x509(&server).expect("parse");
        let eku = server.extended_key_usage().expect("eku").expect("eku present");
        assert!(eku.value.server_auth && !eku.value.client_auth);

        // Second init refuses and changes nothing.
        let before = snapshot(&dir);
        let err = init(&dir).expect_err("second init must fail");
        assert!(matches!(err, KeysError::AlreadyExists(_)), "{err}");
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert_eq!(before, snapshot(&dir));

        // Even with one file missing, nothing is (re)written.
        fs::remove_file(dir.join("terminals/kiosk-1.pem")).expect("remove");
        let before = snapshot(&dir);
        assert!(matches!(init(&dir), Err(KeysError::AlreadyExists(_))));
        assert_eq!(before, snapshot(&dir));
    }

    #[test]
    fn init_refuses_when_only_a_late_target_exists() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        fs::create_dir(dir.join(TERMINALS_DIR)).expect("mkdir");
        fs::write(dir.join("terminals/counter-1.key"), b"precious").expect("write");
        let err = init(dir).expect_err("must refuse");
        assert!(err.to_string().contains("counter-1.key"), "{err}");
        assert!(!dir.join(CA_CERT).exists());
        assert!(!has_keys(dir));
        assert_eq!(fs::read(dir.join("terminals/counter-1.key")).expect("read"), b"precious");
    }

    #[test]
    fn terminal_ids_and_roles_are_validated() {
        for ok in ["a", "reader-1", "K.i_o-s.k", &"x".repeat(32)] {
            assert_eq!(TerminalId::new(ok).expect(ok).as_str(), ok);
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é", &"x".repeat(33), "a\n"] {
            assert!(matches!(TerminalId::new(bad), Err(KeysError::InvalidTerminalId(_))), "{bad}");
        }
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().expect("role"), role);
        }
        assert!("Reader".parse::<Role>().is_err());
        assert!("".parse::<Role>().is_err());
    }

    #[test]
    fn issue_terminal_round_trips_identity_and_refuses_overwrite() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        init(dir).expect("init");
        let id = TerminalId::new("kiosk-042").expect("id");
        let (cert_path, key_path) = issue_terminal(dir, &id, Role::Kiosk).expect("issue");
        assert_eq!(cert_path, dir.join("terminals/kiosk-042.pem"));
        let mode = fs::metadata(&key_path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let der = load_first_cert(&cert_path).expect("cert");
        let (got_id, got_role) = crate::tls::identity_from_cert(&der).expect("identity");
        assert_eq!(got_id, id);
        assert_eq!(got_role, Role::Kiosk);

        let cert = parse_x509(&der).expect("parse");
        let eku = cert.extended_key_usage().expect("eku").expect("eku present");
        assert!(eku.value.client_auth && !eku.value.server_auth && !eku.value.any);
        let ca_der = load_first_cert(&dir.join(CA_CERT)).expect("ca");
        let ca = parse_x509(&ca_der).expect("parse ca");
        assert_eq!(cert.issuer().as_raw(), ca.subject().as_raw());

        // The init terminals round-trip too.
        for (name, role) in INITIAL_TERMINALS {
            let id = TerminalId::new(name).expect("id");
            let der = load_first_cert(&terminal_paths(dir, &id).0).expect("cert");
            assert_eq!(crate::tls::identity_from_cert(&der).expect("identity"), (id, role));
        }

        let before = fs::read(&cert_path).expect("read");
        let err = issue_terminal(dir, &id, Role::Reader).expect_err("must refuse");
        assert!(matches!(err, KeysError::AlreadyExists(_)));
        assert_eq!(before, fs::read(&cert_path).expect("read"));

        // Serial numbers differ between certificates.
        let other = TerminalId::new("kiosk-043").expect("id");
        let (other_path, _) = issue_terminal(dir, &other, Role::Kiosk).expect("issue");
        let other_der = load_first_cert(&other_path).expect("cert");
        let other_cert = parse_x509(&other_der).expect("parse");
        assert_ne!(cert.raw_serial(), other_cert.raw_serial());

        // Inverted validity is refused.
        let opts = TerminalCertOptions {
            not_before: SystemTime::now(),
            not_after: SystemTime::now() - DAY,
            server_auth_only: false,
        };
        let bad = TerminalId::new("bad").expect("id");
        assert!(matches!(
            issue_terminal_with(dir, &bad, Role::Reader, opts),
            Err(KeysError::Validity(_))
        ));
        assert!(!terminal_paths(dir, &bad).0.exists());
    }

    #[test]
    fn issue_terminal_without_ca_fails_cleanly() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let id = TerminalId::new("reader-9").expect("id");
        let err = issue_terminal(tmp.path(), &id, Role::Reader).expect_err("no CA");
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn revoke_accumulates_serials_in_a_signed_crl() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        init(dir).expect("init");
        let serial_of = |name: &str| {
            let id = TerminalId::new(name).expect("id");
            let der = load_first_cert(&terminal_paths(dir, &id).0).expect("cert");
            serial_hex(parse_x509(&der).expect("parse").raw_serial())
        };
        let reader = TerminalId::new("reader-1").expect("id");
        let kiosk = TerminalId::new("kiosk-1").expect("id");
        let crl_path = revoke(dir, &reader).expect("revoke reader");
        assert_eq!(crl_path, dir.join(CRL));
        revoke(dir, &kiosk).expect("revoke kiosk");
        revoke(dir, &kiosk).expect("revoke kiosk again");

        let list = fs::read_to_string(dir.join(REVOKED_LIST)).expect("list");
        assert_eq!(list.lines().count(), 2, "{list}");
        assert!(list.contains(&serial_of("reader-1")));
        assert!(list.contains(&serial_of("kiosk-1")));

        let crl = rustls_pki_types::CertificateRevocationListDer::from_pem_file(&crl_path)
            .expect("crl pem");
        let (_, crl) = x509_parser::parse_x509_crl(crl.as_ref()).expect("parse crl");
        let serials: Vec<String> =
            crl.iter_revoked_certificates().map(|r| serial_hex(r.raw_serial())).collect();
        assert_eq!(serials.len(), 2);
        assert!(serials.contains(&serial_of("reader-1")));
        assert!(serials.contains(&serial_of("kiosk-1")));
        assert!(!serials.contains(&serial_of("counter-1")));
        assert!(!dir.join("revoked.txt.tmp").exists());
        assert!(!dir.join("crl.pem.tmp").exists());

        let missing = TerminalId::new("nobody").expect("id");
        assert!(revoke(dir, &missing).is_err());
    }

    #[test]
    fn issuer_keys_load_rotate_and_hide_key_bytes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        init(dir).expect("init");
        let path = dir.join(ISSUER_KEYS);
        let v1 = *IssuerKeys::load(&path).expect("load").key(1).expect("v1");

        assert_eq!(add_issuer_version(dir).expect("add"), 2);
        assert_eq!(add_issuer_version(dir).expect("add"), 3);
        let keys = IssuerKeys::load(&path).expect("load");
        assert_eq!(keys.current_version(), 3);
        assert_eq!(keys.versions().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(keys.key(1), Some(&v1));
        assert_ne!(keys.key(2), keys.key(3));
        assert_eq!(keys.key(4), None);
        assert_eq!(keys.current().0, 3);
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.join("issuer.key.tmp").exists());

        let text = fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 3);
        assert!(text.starts_with(&format!("1 {}\n", to_hex(&v1))));

        let debug = format!("{keys:?}");
        for v in 1..=3 {
            let hex = to_hex(keys.key(v).expect("key"));
            assert!(!debug.contains(&hex), "{debug}");
            assert!(!debug.contains(&hex[..8]), "{debug}");
        }
        assert!(debug.contains("versions"), "{debug}");

        // A stale temp file blocks rotation instead of racing it.
        fs::write(dir.join("issuer.key.tmp"), b"").expect("write");
        assert!(add_issuer_version(dir).is_err());
        assert_eq!(fs::read_to_string(&path).expect("read"), text);
    }

    #[test]
    fn issuer_keys_reject_malformed_files_without_echoing_them() {
        let k = "ab".repeat(32);
        let p = Path::new("issuer.key");
        let ok = IssuerKeys::parse(p, &format!("# comment\n\n7 {k}\n2 {}\n", k.to_uppercase()))
            .expect("parse");
        assert_eq!(ok.current_version(), 7);
        for bad in [
            String::new(),
            format!("0 {k}"),
            format!("65536 {k}"),
            format!("x {k}"),
            format!("1 {}", &k[..62]),
            format!("1 {k}00"),
            format!("1 {}zz", &k[..62]),
            format!("1 {k} extra"),
            format!("1 {k}\n1 {k}"),
            "1".to_string(),
        ] {
            let err = IssuerKeys::parse(p, &bad).expect_err(&bad);
            assert!(!err.to_string().contains(&k), "{err}");
        }
    }

    #[test]
    fn add_issuer_version_keeps_a_file_without_trailing_newline() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join(ISSUER_KEYS);
        let k = "01".repeat(32);
        fs::write(&path, format!("5 {k}")).expect("write");
        assert_eq!(add_issuer_version(tmp.path()).expect("add"), 6);
        let keys = IssuerKeys::load(&path).expect("load");
        assert_eq!(keys.versions().collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(keys.key(5), Some(&[1u8; 32]));
    }

    #[test]
    fn hex_helpers() {
        assert_eq!(to_hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(from_hex32(&"aB".repeat(32)), Some([0xab; 32]));
        assert_eq!(from_hex32("00"), None);
        assert_eq!(serial_hex(&[0, 0, 0x12]), "12");
    }
}
