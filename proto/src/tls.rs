//! Mutual TLS on the coordinator <-> expert-node link: loading PEM files into tonic's
//! (rustls) configurations, and a development CA with its certificates (`switchyard certs`).
//!
//! Both ends present a certificate and both require the peer's to chain to the same CA:
//! a node serves only clients holding a CA-signed certificate, and a coordinator talks only
//! to nodes whose certificate is CA-signed and names the host it dialled.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A peer that opens a TCP connection and never finishes the handshake is dropped after
/// this long, so idle half-open connections cannot pile up on a node.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    NotPem { path: PathBuf, what: &'static str },
    #[error("give all of --tls-cert, --tls-key and --tls-ca, or none (missing {0})")]
    Incomplete(&'static str),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The three files of one end of an mTLS link, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This end's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA that must have signed the peer's certificate (PEM).
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `Some` when all three are given, `None` when none is, an error for a partial set:
    /// a half-configured TLS setup must not silently fall back to plaintext.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            (cert, key, _) => Err(TlsError::Incomplete(if cert.is_none() {
                "--tls-cert"
            } else if key.is_none() {
                "--tls-key"
            } else {
                "--tls-ca"
            })),
        }
    }

    /// Reads the files. Certificates are read once: rotating them means restarting the
    /// process (SECURITY.md).
    pub fn load(&self) -> Result<Tls, TlsError> {
        let cert = read_pem(&self.cert, "CERTIFICATE")?;
        let key = read_pem(&self.key, "PRIVATE KEY")?;
        let ca = read_pem(&self.ca, "CERTIFICATE")?;
        Ok(Tls {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
        })
    }
}

/// Reads a PEM file and checks it holds a block of the expected kind, so that a swapped
/// or empty file is reported by name at start-up rather than as a handshake failure later.
fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    // "PRIVATE KEY" also matches "RSA PRIVATE KEY" and "EC PRIVATE KEY".
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.contains(what));
    if !found {
        return Err(TlsError::NotPem {
            path: path.to_owned(),
            what,
        });
    }
    Ok(bytes)
}

/// Loaded TLS material: this end's identity and the CA it trusts.
#[derive(Debug, Clone)]
pub struct Tls {
    identity: Identity,
    ca: Certificate,
}

impl Tls {
    /// For an expert node: present our certificate, require a client certificate signed
    /// by the CA (tonic makes client authentication mandatory once a client CA is set).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// For a coordinator dialling `host`: trust only the CA (no system roots), check that
    /// the node's certificate names `host` (a DNS name or an IP address), and present our
    /// own certificate.
    pub fn client_config(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name(host)
            .identity(self.identity.clone())
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// The host part of `HOST:PORT`, `[V6]:PORT` or `scheme://HOST:PORT/...`, as a certificate
/// must name it.
pub fn host_of(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// What [`write_dev_certs`] wrote.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca: PathBuf,
    pub coordinator: TlsFiles,
    pub nodes: Vec<TlsFiles>,
}

/// Names every development certificate carries, so that everything on one machine
/// (`up --tls`, tests) verifies whichever loopback name it dials.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Writes a development CA and certificates into `dir` (created if missing):
///
/// | file | what |
/// |---|---|
/// | `ca.crt`, `ca.key` | the CA (self-signed) |
/// | `coordinator.crt`, `coordinator.key` | the coordinator's client certificate |
/// | `node-I.crt`, `node-I.key` | expert node I's certificate, I = 0..nodes |
///
/// Every leaf is valid for both TLS server and client authentication and names
/// `localhost`, `127.0.0.1`, `::1`, its own name (`coordinator`, `node-I`) and every name
/// in `extra_names` (the hosts nodes are reached at elsewhere). Keys are written mode 0600.
pub fn write_dev_certs(
    dir: &Path,
    nodes: usize,
    extra_names: &[String],
) -> Result<DevCerts, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    // A distinct name per CA, so that two development clusters' CAs are told apart (in
    // logs, and by verifiers, which look issuers up by name).
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("Switchyard development CA {stamp}"),
    );
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_path = dir.join("ca.crt");
    write(&ca_path, ca_cert.pem().as_bytes(), false)?;
    write(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |name: &str| -> Result<TlsFiles, TlsError> {
        let mut names: Vec<String> = LOOPBACK_NAMES.iter().map(|s| (*s).to_owned()).collect();
        names.push(name.to_owned());
        for extra in extra_names {
            if !names.contains(extra) {
                names.push(extra.clone());
            }
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer)?;
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: ca_path.clone(),
        };
        write(&files.cert, cert.pem().as_bytes(), false)?;
        write(&files.key, key.serialize_pem().as_bytes(), true)?;
        Ok(files)
    };
    let coordinator = leaf("coordinator")?;
    let nodes = (0..nodes)
        .map(|i| leaf(&format!("node-{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DevCerts {
        ca: ca_path,
        coordinator,
        nodes,
    })
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(path).map_err(err)?;
    // The mode above applies only to a new file: tighten one that already existed too.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    f.write_all(bytes).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_taken_from_every_address_form() {
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_of("node-1.cluster.local:7000"), "node-1.cluster.local");
        assert_eq!(host_of("https://node-1:7000/"), "node-1");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("node-1"), "node-1");
    }

    #[test]
    fn partial_flag_sets_are_refused() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert!(TlsFiles::from_flags(None, None, None).unwrap().is_none());
        assert!(
            TlsFiles::from_flags(p("c"), p("k"), p("a"))
                .unwrap()
                .is_some()
        );
        let e = TlsFiles::from_flags(p("c"), None, p("a")).unwrap_err();
        assert!(e.to_string().contains("--tls-key"), "{e}");
        let e = TlsFiles::from_flags(p("c"), p("k"), None).unwrap_err();
        assert!(e.to_string().contains("--tls-ca"), "{e}");
    }

    #[test]
    fn dev_certs_are_written_loadable_and_keys_private() {
        let dir = std::env::temp_dir().join(format!("switchyard-tls-test-{}", std::process::id()));
        let certs = write_dev_certs(&dir, 2, &["node.example".into()]).unwrap();
        assert_eq!(certs.nodes.len(), 2);
        for f in [&certs.coordinator, &certs.nodes[0], &certs.nodes[1]] {
            f.load().unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&f.key).unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0, "{} is readable by others", f.key.display());
            }
        }
        assert!(dir.join("node-1.crt").exists() && dir.join("ca.key").exists());
        // A key where a certificate belongs is named in the error.
        let swapped = TlsFiles {
            cert: certs.nodes[0].key.clone(),
            ..certs.nodes[0].clone()
        };
        let e = swapped.load().unwrap_err();
        assert!(e.to_string().contains("node-0.key"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
