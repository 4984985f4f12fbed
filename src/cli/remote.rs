//! `snapblk --remote HOST:PORT`: the CLI's side of a daemon's
//! `--control-listen`, mutual TLS with rustls (the daemon's certificate
//! checked against `--tls-ca` and the name in HOST; ours from `--tls-cert`
//! and `--tls-key`). Owns the connection and what its failures mean to a
//! person; never the protocol, which is the same lines as on the UNIX socket.

use super::client::CliError;
use crate::frontend::nbd::tls::{load_certs, load_key};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A daemon reached over TCP and TLS.
#[derive(Clone)]
pub struct Remote {
    pub addr: String,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

/// `--tls-cert/--tls-key/--tls-ca` for `--remote`, else
/// `$SNAPBLK_TLS_CERT/KEY/CA`.
pub struct ClientFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

fn flag_or_env(flag: Option<PathBuf>, var: &str) -> Option<PathBuf> {
    flag.or_else(|| {
        std::env::var_os(var)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    })
}

/// The TLS client setup all remote daemons of one command share.
pub fn client_config(files: ClientFiles) -> Result<Arc<ClientConfig>, CliError> {
    let cert = flag_or_env(files.cert, "SNAPBLK_TLS_CERT");
    let key = flag_or_env(files.key, "SNAPBLK_TLS_KEY");
    let ca = flag_or_env(files.ca, "SNAPBLK_TLS_CA");
    let (Some(cert), Some(key), Some(ca)) = (cert, key, ca) else {
        return Err(CliError::new(
            "a remote daemon needs this CLI's certificate, its key and the CA that signed \
             the daemon's certificate",
            "give --tls-cert FILE --tls-key FILE --tls-ca FILE before the command (or set \
             $SNAPBLK_TLS_CERT, $SNAPBLK_TLS_KEY, $SNAPBLK_TLS_CA)",
        ));
    };
    let plain = |e: io::Error| CliError::plain(e.to_string());
    let mut roots = RootCertStore::empty();
    for c in load_certs(&ca, "TLS CA file").map_err(plain)? {
        roots.add(c).map_err(|e| {
            CliError::new(
                format!(
                    "the TLS CA file {} is not a usable CA certificate ({e})",
                    ca.display()
                ),
                "give the PEM certificate of the CA that signed the daemon's certificate",
            )
        })?;
    }
    let chain = load_certs(&cert, "TLS certificate").map_err(plain)?;
    let key_der = load_key(&key).map_err(plain)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::plain(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| {
            CliError::new(
                format!(
                    "the TLS certificate {} and key {} do not go together ({e})",
                    cert.display(),
                    key.display()
                ),
                "give the key that belongs to the certificate",
            )
        })?;
    Ok(Arc::new(config))
}

/// What an I/O error on a remote connection means, and what to do.
pub fn explain(addr: &str, e: &io::Error) -> CliError {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidCertificate(why)) => CliError::new(
            format!("the daemon at {addr} has a certificate this CLI does not trust ({why:?})"),
            "give --tls-ca FILE with the CA that signed the daemon's --tls-cert, and reach it \
             by a name or address that certificate holds",
        ),
        Some(rustls::Error::AlertReceived(alert)) => CliError::new(
            format!("the daemon at {addr} refused this CLI's certificate (TLS alert {alert:?})"),
            "give --tls-cert and --tls-key with a certificate signed by the CA the daemon \
             trusts (its --tls-ca)",
        ),
        Some(other) => CliError::new(
            format!("TLS with the daemon at {addr} failed: {other}"),
            "check that HOST:PORT is the daemon's --control-listen address",
        ),
        None => {
            let reason = super::strip_os_error(&e.to_string()).to_lowercase();
            let hint = match e.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                    "the daemon closed the connection: check that HOST:PORT is its \
                     --control-listen address, that it has room for another connection, \
                     and its log"
                }
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    "the daemon did not answer in time: check that HOST:PORT is its \
                     --control-listen address and that it is not overloaded"
                }
                _ => {
                    "check that the daemon runs with --control-listen HOST:PORT and that \
                     this machine can reach that address"
                }
            };
            CliError::new(
                format!("cannot talk to the daemon at {addr}: {reason}"),
                hint,
            )
        }
    }
}

impl Remote {
    pub fn new(addr: String, config: Arc<ClientConfig>) -> Remote {
        Remote { addr, config }
    }

    /// Connects and completes the TLS handshake (so that a refused
    /// certificate shows here); `timeout` bounds the connect and every
    /// read and write after it.
    pub fn connect(
        &self,
        timeout: Option<Duration>,
    ) -> Result<StreamOwned<ClientConnection, TcpStream>, CliError> {
        let fail = |e: io::Error| explain(&self.addr, &e);
        let host = self
            .addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                CliError::new(
                    format!("--remote {}: not HOST:PORT", self.addr),
                    "give the daemon's --control-listen address, e.g. --remote 10.0.0.5:7900",
                )
            })?;
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            CliError::new(
                format!("--remote {}: {e}", self.addr),
                "give a host name or an IP address",
            )
        })?;
        let mut last = None;
        let mut stream = None;
        for a in self.addr.to_socket_addrs().map_err(fail)? {
            let tried = match timeout {
                Some(t) => TcpStream::connect_timeout(&a, t),
                None => TcpStream::connect(a),
            };
            match tried {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = match (stream, last) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(fail(e)),
            (None, None) => return Err(fail(io::Error::other("the name has no address"))),
        };
        stream
            .set_read_timeout(timeout)
            .and_then(|_| stream.set_write_timeout(timeout))
            .map_err(fail)?;
        let conn = ClientConnection::new(self.config.clone(), name)
            .map_err(|e| CliError::plain(format!("TLS setup: {e}")))?;
        let mut tls = StreamOwned::new(conn, stream);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).map_err(fail)?;
        }
        Ok(tls)
    }
}
