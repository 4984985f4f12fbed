//! NBD over TLS: settings, the STARTTLS handshake, and TLS record I/O for
//! the transmission phase.
//!
//! TLS comes in the way qemu-nbd and nbdkit offer it: fixed newstyle
//! negotiation, then `NBD_OPT_STARTTLS`, `NBD_REP_ACK`, and a TLS handshake
//! on the same socket; every option after that travels inside TLS. The modes
//! are nbdkit's `--tls`: `off` (STARTTLS is refused), `on` (offered, plain
//! text allowed) and `require` (every option but STARTTLS and ABORT is
//! answered `NBD_REP_ERR_TLS_REQD` until TLS is up). With a CA file, clients
//! must present a certificate signed by it. The crypto is rustls with its
//! `ring` provider; nothing here encrypts by hand.
//!
//! How transmission runs over TLS, and why: this kernel has no kTLS, and the
//! transmission loop runs on the connection thread's io_uring executor,
//! directly on the socket. Two designs were possible:
//! - a TLS pump per connection moving plaintext between rustls and one end
//!   of a socketpair, the unchanged loop serving the other end: every byte
//!   would cross two more socket buffers and every request would hop
//!   threads, which on a 2-core machine shared with the client shows in
//!   every benchmark column;
//! - the loop's socket I/O made a [`TlsIo`] when TLS is up: ciphertext is
//!   received and sent on the same ring as before, and rustls decrypts and
//!   encrypts in between, on the connection's own thread.
//!
//! The second is what this module does: no extra thread and no extra hop,
//! one `recv` and one `send` per batch as in plain text. Only the reader
//! task receives and only the writer task sends, so records never
//! interleave; both share the rustls session through a `RefCell` that is
//! never held across an `.await`. A plaintext connection does not go
//! through any of this.

use super::transmission::{send_all, Activity};
use crate::runtime;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Whether NBD clients may, or must, use TLS (nbdkit's `--tls`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// STARTTLS is refused.
    Off,
    /// Offered; clients may also stay in plain text.
    On,
    /// Every client must start TLS before anything else.
    Require,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }
}

/// Where the server's certificate, its key and the client CA are.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// PEM: the server's certificate, then any intermediates.
    pub cert: Option<PathBuf>,
    /// PEM private key; must not be readable by group or others.
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s): when set, clients must present a certificate
    /// that it signed.
    pub ca: Option<PathBuf>,
}

/// The TLS side of an NBD server: its mode and, unless off, its rustls
/// configuration.
#[derive(Clone)]
pub struct NbdTls {
    mode: TlsMode,
    config: Option<Arc<ServerConfig>>,
    client_certs: bool,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls")
            .field("mode", &self.mode)
            .field("client_certs", &self.client_certs)
            .finish()
    }
}

/// rustls refuses to buffer more ciphertext than this before it is sent:
/// the writer encrypts a batch of replies in pieces of this size.
const TLS_SEND_BUFFER: usize = 256 * 1024;

fn config_error(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

pub(crate) fn load_certs(path: &Path, what: &str) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            config_error(format!(
                "cannot read the {what} {}: {e}; give a PEM file",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(config_error(format!(
            "the {what} {} holds no certificate; give a PEM file with \"BEGIN CERTIFICATE\" blocks",
            path.display()
        )));
    }
    Ok(certs)
}

pub(crate) fn load_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    crate::security::check_private_file_mode(path, "the TLS private key")?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        config_error(format!(
            "cannot read the TLS private key {}: {e}; give a PEM key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        ))
    })
}

impl NbdTls {
    /// No TLS: STARTTLS is refused.
    pub fn off() -> NbdTls {
        NbdTls {
            mode: TlsMode::Off,
            config: None,
            client_certs: false,
        }
    }

    /// Loads and checks the certificate, key and CA for `mode`. Errors say
    /// which file or option is wrong and what to do.
    pub fn load(mode: TlsMode, files: &TlsFiles) -> io::Result<NbdTls> {
        let (cert, key) = match (&files.cert, &files.key) {
            (Some(c), Some(k)) => (c, k),
            (None, None) if files.ca.is_none() && mode == TlsMode::Off => return Ok(NbdTls::off()),
            (None, None) if files.ca.is_none() => {
                return Err(config_error(format!(
                "--tls={} needs a certificate and its key; give --tls-cert FILE and --tls-key FILE",
                mode.as_str()
            )))
            }
            _ => {
                return Err(config_error(
                    "NBD TLS needs a certificate and its key; give both --tls-cert FILE and \
                     --tls-key FILE (and --tls-ca FILE to require client certificates)"
                        .into(),
                ))
            }
        };
        let chain = load_certs(cert, "TLS certificate")?;
        let key_der = load_key(key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(format!("TLS setup: {e}")))?;
        let builder = match &files.ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in load_certs(ca, "TLS CA file")? {
                    roots.add(c).map_err(|e| {
                        config_error(format!(
                            "the TLS CA file {} is not a usable CA certificate ({e}); give the PEM \
                             certificate of the CA that signs client certificates",
                            ca.display()
                        ))
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| {
                        config_error(format!(
                            "the TLS CA file {}: {e}; give a PEM CA certificate",
                            ca.display()
                        ))
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key_der).map_err(|e| {
            config_error(format!(
                "the TLS certificate {} and key {} do not go together ({e}); give the key \
                 that belongs to the certificate",
                cert.display(),
                key.display()
            ))
        })?;
        Ok(NbdTls {
            mode,
            config: (mode != TlsMode::Off).then(|| Arc::new(config)),
            client_certs: files.ca.is_some(),
        })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Clients must present a certificate from the configured CA.
    pub fn client_certs(&self) -> bool {
        self.client_certs
    }

    /// Runs the TLS handshake on `sock` (blocking; the socket's receive
    /// timeout bounds it) right after STARTTLS was acknowledged.
    pub(crate) fn accept<S: Read + Write>(&self, sock: &mut S) -> io::Result<ServerConnection> {
        let config = self
            .config
            .clone()
            .ok_or_else(|| io::Error::other("TLS is off"))?;
        let mut conn = ServerConnection::new(config)
            .map_err(|e| io::Error::other(format!("TLS setup: {e}")))?;
        let mut handshake = || -> io::Result<()> {
            while conn.is_handshaking() {
                conn.complete_io(sock)?;
            }
            // Session tickets and anything else rustls queued.
            while conn.wants_write() {
                conn.write_tls(sock)?;
            }
            Ok(())
        };
        handshake().map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
        conn.set_buffer_limit(Some(TLS_SEND_BUFFER));
        Ok(conn)
    }
}

/// A TLS session in the transmission phase: the reader task calls
/// [`TlsIo::recv`], the writer task [`TlsIo::send_all`] and
/// [`TlsIo::flush`].
pub(crate) struct TlsIo {
    conn: RefCell<ServerConnection>,
    /// Ciphertext received but not yet taken by rustls (it takes a record
    /// at a time and at most 16 KiB of plaintext ahead).
    cipher_in: RefCell<Vec<u8>>,
    in_start: Cell<usize>,
    in_end: Cell<usize>,
    eof: Cell<bool>,
    /// Ciphertext ready to send, kept for reuse.
    cipher_out: RefCell<Vec<u8>>,
}

/// Ciphertext received per `recv`: a 1 MiB WRITE takes four.
const CIPHER_IN: usize = 256 * 1024;

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl TlsIo {
    pub(crate) fn new(conn: ServerConnection) -> TlsIo {
        TlsIo {
            conn: RefCell::new(conn),
            cipher_in: RefCell::new(vec![0u8; CIPHER_IN]),
            in_start: Cell::new(0),
            in_end: Cell::new(0),
            eof: Cell::new(false),
            cipher_out: RefCell::new(Vec::new()),
        }
    }

    /// Reads plaintext into `out`; `Ok(0)` at the end of the stream (with
    /// or without the peer's close_notify: telling a clean end from a cut
    /// request is the caller's business, as in plain text).
    pub(crate) async fn recv(&self, fd: RawFd, out: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut conn = self.conn.borrow_mut();
                match conn.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                let (start, end) = (self.in_start.get(), self.in_end.get());
                if start < end || self.eof.get() {
                    let cipher = self.cipher_in.borrow();
                    let mut avail = &cipher[start..end];
                    conn.read_tls(&mut avail)?;
                    self.in_start.set(end - avail.len());
                    conn.process_new_packets().map_err(tls_error)?;
                    continue;
                }
            }
            let mut cipher = std::mem::take(&mut *self.cipher_in.borrow_mut());
            let got = runtime::recv(fd, &mut cipher).await;
            *self.cipher_in.borrow_mut() = cipher;
            let n = got?;
            self.in_start.set(0);
            self.in_end.set(n);
            if n == 0 {
                self.eof.set(true);
            }
        }
    }

    /// rustls has records to send (replies, or its own answers such as a
    /// key update): the writer should [`TlsIo::flush`].
    pub(crate) fn wants_write(&self) -> bool {
        self.conn.borrow().wants_write()
    }

    /// Encrypts and sends all of `slices`, in pieces of at most
    /// [`TLS_SEND_BUFFER`] bytes of ciphertext.
    pub(crate) async fn send_all(
        &self,
        fd: RawFd,
        slices: &[&[u8]],
        activity: &Activity,
    ) -> io::Result<()> {
        let mut index = 0;
        let mut skip = 0;
        loop {
            {
                let mut conn = self.conn.borrow_mut();
                loop {
                    // Skip what is sent and empty slices.
                    while index < slices.len() && skip == slices[index].len() {
                        index += 1;
                        skip = 0;
                    }
                    if index == slices.len() {
                        break;
                    }
                    let ios: Vec<IoSlice> = std::iter::once(&slices[index][skip..])
                        .chain(slices[index + 1..].iter().copied())
                        .filter(|s| !s.is_empty())
                        .map(IoSlice::new)
                        .collect();
                    let mut n = conn.writer().write_vectored(&ios)?;
                    if n == 0 {
                        break; // the send buffer is full: send it first
                    }
                    while n > 0 {
                        let here = (slices[index].len() - skip).min(n);
                        skip += here;
                        n -= here;
                        if skip == slices[index].len() {
                            index += 1;
                            skip = 0;
                        }
                    }
                }
            }
            self.flush(fd, activity).await?;
            if index == slices.len() {
                return Ok(());
            }
        }
    }

    /// Sends every record rustls holds.
    pub(crate) async fn flush(&self, fd: RawFd, activity: &Activity) -> io::Result<()> {
        loop {
            let mut out = std::mem::take(&mut *self.cipher_out.borrow_mut());
            out.clear();
            {
                let mut conn = self.conn.borrow_mut();
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
            }
            if out.is_empty() {
                *self.cipher_out.borrow_mut() = out;
                return Ok(());
            }
            let sent = send_all(fd, &[&out], activity).await;
            *self.cipher_out.borrow_mut() = out;
            sent?;
        }
    }

    /// Says goodbye the TLS way (close_notify), so that the client can tell
    /// a clean close from a cut connection.
    pub(crate) async fn close(&self, fd: RawFd, activity: &Activity) {
        self.conn.borrow_mut().send_close_notify();
        let _ = self.flush(fd, activity).await;
    }
}
