//! Mutual TLS for the TCP transport's peer links (optional).
//!
//! Every replica holds a certificate signed by the cluster's CA and the
//! CA's certificate. A dialer checks that the listener's certificate is
//! signed by the CA *and* names the address it dialled (an IP address in
//! `subjectAltName`, as etcd does); a listener accepts only dialers whose
//! certificate is signed by the CA, and the transport then checks that it
//! names the peer address of the replica the dialer claims to be. TLS 1.3 only. The cluster-key
//! challenge then runs inside the encrypted stream, so a replica needs both
//! the right certificate and the cluster key to join.
//!
//! [`PeerStream`] is one non-blocking connection, plain or TLS, with the
//! `Read`/`Write` the transport uses either way.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use rustls::{ServerConnection, crypto::CryptoProvider};

/// The three files of a replica's TLS setup.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TlsFiles {
    /// This replica's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The cluster CA's certificate(s) (PEM).
    pub ca: PathBuf,
}

/// Ready-made TLS configurations for both ends of a peer link.
pub struct TlsContext {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsContext")
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("reading the {what} {}: {}", path.display(), pem_error(&e)))?;
    let certs: Vec<_> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| format!("reading the {what} {}: {}", path.display(), pem_error(&e)))?;
    if certs.is_empty() {
        return Err(format!(
            "the {what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// Whether `cert` (DER) names `ip` in its subjectAltName.
fn names_ip(cert: &CertificateDer<'_>, ip: IpAddr) -> bool {
    let name = ServerName::IpAddress(ip.into());
    webpki::EndEntityCert::try_from(cert)
        .and_then(|c| c.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

impl TlsContext {
    /// Reads and checks the three files; every error names the file and
    /// what is wrong. `own_ip`: this replica's peer address, which its
    /// certificate must name (the others check it).
    pub fn load(files: &TlsFiles, own_ip: IpAddr) -> Result<TlsContext, String> {
        let chain = certs(&files.cert, "certificate")?;
        if !names_ip(&chain[0], own_ip) {
            return Err(format!(
                "the certificate {} does not name this replica's peer address {own_ip} (subjectAltName IP:{own_ip}); the other replicas would refuse it",
                files.cert.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
            format!(
                "reading the private key {}: {}",
                files.key.display(),
                match e {
                    rustls::pki_types::pem::Error::NoItemsFound =>
                        "no PEM private key in it (-----BEGIN PRIVATE KEY-----)".to_string(),
                    e => pem_error(&e),
                }
            )
        })?;
        let mut roots = RootCertStore::empty();
        for c in certs(&files.ca, "CA certificate")? {
            roots.add(c).map_err(|e| {
                format!(
                    "the CA certificate {} cannot be used: {e}",
                    files.ca.display()
                )
            })?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| format!("the CA certificate {}: {e}", files.ca.display()))?;
        let mismatch = |e: rustls::Error| {
            format!(
                "the certificate {} and the key {} do not go together: {e}",
                files.cert.display(),
                files.key.display()
            )
        };
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(mismatch)?;
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(mismatch)?;
        // A peer link is long-lived and redialled rarely: no session tickets
        // or resumption (a full handshake, with certificates, every time).
        server.send_tls13_tickets = 0;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsContext {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    fn dial(&self, addr: SocketAddr) -> io::Result<Connection> {
        let name = ServerName::IpAddress(addr.ip().into());
        ClientConnection::new(self.client.clone(), name)
            .map(Connection::from)
            .map_err(io::Error::other)
    }

    fn accept(&self) -> io::Result<Connection> {
        ServerConnection::new(self.server.clone())
            .map(Connection::from)
            .map_err(io::Error::other)
    }
}

/// A TLS connection and its socket.
pub struct TlsStream {
    sock: TcpStream,
    conn: Connection,
    /// Bytes read from the socket that rustls has not taken yet: the socket
    /// is read 64 KiB at a time (rustls alone reads 4 KiB per call).
    inbuf: Vec<u8>,
    inpos: usize,
    inend: usize,
}

impl TlsStream {
    fn new(sock: TcpStream, conn: Connection) -> Box<TlsStream> {
        Box::new(TlsStream {
            sock,
            conn,
            inbuf: Vec::new(),
            inpos: 0,
            inend: 0,
        })
    }
}

/// One peer connection: a plain TCP stream, or TLS over one.
pub enum PeerStream {
    /// No TLS.
    Plain(TcpStream),
    /// TLS (boxed: a TLS connection's state is large).
    Tls(Box<TlsStream>),
}

impl PeerStream {
    /// Whether this is plain TCP (no TLS layer between reads and the socket).
    pub fn is_plain(&self) -> bool {
        matches!(self, PeerStream::Plain(_))
    }

    /// A dialled connection to `addr` (TLS when `tls` is given).
    pub fn dialled(
        stream: TcpStream,
        addr: SocketAddr,
        tls: Option<&TlsContext>,
    ) -> io::Result<Self> {
        Ok(match tls {
            None => PeerStream::Plain(stream),
            Some(t) => PeerStream::Tls(TlsStream::new(stream, t.dial(addr)?)),
        })
    }

    /// An accepted connection (TLS when `tls` is given).
    pub fn accepted(stream: TcpStream, tls: Option<&TlsContext>) -> io::Result<Self> {
        Ok(match tls {
            None => PeerStream::Plain(stream),
            Some(t) => PeerStream::Tls(TlsStream::new(stream, t.accept()?)),
        })
    }

    /// The TCP stream (to register with mio, to ask for errors).
    pub fn tcp(&mut self) -> &mut TcpStream {
        match self {
            PeerStream::Plain(s) => s,
            PeerStream::Tls(b) => &mut b.sock,
        }
    }

    /// Writes what TLS has ready for the socket (handshake messages,
    /// encrypted records) until done or the socket is full. Plain: nothing.
    pub fn flush_tls(&mut self) -> io::Result<()> {
        let PeerStream::Tls(b) = self else {
            return Ok(());
        };
        write_pending(&mut b.sock, &mut b.conn)
    }

    /// TLS: whether the peer's certificate (already checked against the CA)
    /// names `ip`. Plain: true.
    pub fn peer_names(&self, ip: IpAddr) -> bool {
        match self {
            PeerStream::Plain(_) => true,
            PeerStream::Tls(b) => b
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .is_some_and(|c| names_ip(c, ip)),
        }
    }

    /// Whether encrypted bytes wait for the socket.
    pub fn tls_pending(&self) -> bool {
        matches!(self, PeerStream::Tls(b) if b.conn.wants_write())
    }
}

/// A TLS failure, worded for the operator who reads the log line.
fn tls_error(e: rustls::Error) -> io::Error {
    let why = match &e {
        rustls::Error::InvalidCertificate(c) => format!(
            "TLS: the peer's certificate is not accepted ({c:?}): is it signed by this cluster's CA (tls_ca), unexpired, and does it name the peer address's IP?"
        ),
        rustls::Error::NoCertificatesPresented => {
            "TLS: the peer presented no certificate (every replica needs tls_cert and tls_key)"
                .into()
        }
        rustls::Error::AlertReceived(a) => format!(
            "TLS: the peer refused the handshake (alert {a:?}): it does not accept this replica's certificate, or its own is not accepted here"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("TLS: the peer does not speak TLS ({e}); is TLS set up on every replica?")
        }
        _ => format!("TLS: {e}"),
    };
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Writes what `conn` has for the socket until done or the socket is full.
fn write_pending(sock: &mut TcpStream, conn: &mut Connection) -> io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Plaintext from a TLS connection: what is decrypted already, else what
/// the socket has (WouldBlock once it is drained, so edge-triggered polling
/// sees the next bytes). Ok(0) at the end of the stream.
fn tls_read(t: &mut TlsStream, buf: &mut [u8]) -> io::Result<usize> {
    const CHUNK: usize = 64 << 10;
    loop {
        match t.conn.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The peer closed TCP without close_notify: an end all the same.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
            Err(e) => return Err(e),
        }
        if t.inpos < t.inend {
            // Feed rustls what was read; it takes up to a record or so per call.
            let n = t.conn.read_tls(&mut &t.inbuf[t.inpos..t.inend])?;
            t.inpos += n;
            let state = t.conn.process_new_packets();
            // Handshake answers and alerts go out even when the packets failed.
            let _ = write_pending(&mut t.sock, &mut t.conn);
            state.map_err(tls_error)?;
            continue;
        }
        if t.inbuf.is_empty() {
            t.inbuf = vec![0; CHUNK];
        }
        let got = t.sock.read(&mut t.inbuf);
        t.inpos = 0;
        t.inend = *got.as_ref().unwrap_or(&0);
        match got {
            Ok(0) => {
                // EOF: what was decrypted before it is still delivered.
                let _ = t.conn.read_tls(&mut io::empty());
                t.conn.process_new_packets().map_err(tls_error)?;
                return match t.conn.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::UnexpectedEof
                        ) =>
                    {
                        Ok(0)
                    }
                    Err(e) => Err(e),
                };
            }
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
}

impl Read for PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            PeerStream::Plain(s) => s.read(buf),
            PeerStream::Tls(b) => tls_read(b, buf),
        }
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let b = match self {
            PeerStream::Plain(s) => return s.write(buf),
            PeerStream::Tls(b) => b,
        };
        let n = b.conn.writer().write(buf)?;
        self.flush_tls()?;
        if n == 0 && !buf.is_empty() {
            // rustls' buffer is full and the socket takes nothing: wait for writable.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            PeerStream::Plain(s) => s.flush(),
            PeerStream::Tls(_) => self.flush_tls(),
        }
    }
}
