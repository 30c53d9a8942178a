//! TLS for the socket engines (`rediss://`, NATS `tls://`), on the OpenSSL that libpq already
//! links. The server's certificate is always verified, chain and host name (or IP address):
//! against the system's trust store, or the PEM file the URL's `ca=` option names. `cert=`
//! and `key=` name a client certificate and its key (PEM), for servers that ask for one.
//!
//! A connection is a [`Transport`]: plain TCP, a TLS handshake in progress, or a TLS session.
//! Everything on it is non-blocking; OpenSSL's "want read / want write" surfaces as
//! `WouldBlock`, and the socket is registered for both edges, so whichever the handshake or a
//! record needs next wakes the engine.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use mio::net::TcpStream;

use crate::error::Error;

/// The `?key=value&…` options of a broker URL that concern TLS.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsOptions {
    /// PEM file of the certificates to trust instead of the system's.
    pub(crate) ca: Option<String>,
    /// PEM files of a client certificate (chain) and its private key.
    pub(crate) cert: Option<String>,
    pub(crate) key: Option<String>,
}

impl TlsOptions {
    /// Takes the TLS options out of `query`; refuses them when the connection is not TLS, so
    /// that a `ca=` on a `redis://` URL is not silently ignored.
    pub(crate) fn take(
        query: &mut Vec<(String, String)>,
        tls: bool,
    ) -> Result<Option<TlsOptions>, Error> {
        let mut options = TlsOptions::default();
        let mut found = false;
        query.retain(|(key, value)| {
            let slot = match key.as_str() {
                "ca" => &mut options.ca,
                "cert" => &mut options.cert,
                "key" => &mut options.key,
                _ => return true,
            };
            *slot = Some(value.clone());
            found = true;
            false
        });
        if found && !tls {
            return Err(Error::InvalidArgument(
                "ca=, cert= and key= are TLS options: use rediss:// or tls://",
            ));
        }
        if options.cert.is_some() != options.key.is_some() {
            return Err(Error::InvalidArgument(
                "a client certificate needs both cert= and key=",
            ));
        }
        Ok(tls.then_some(options))
    }
}

#[cfg(feature = "tls")]
mod openssl_tls {
    use openssl::ssl::{
        HandshakeError, MidHandshakeSslStream, SslConnector, SslConnectorBuilder, SslFiletype,
        SslMethod, SslStream, SslVersion,
    };
    use openssl::x509::X509VerifyResult;

    use super::*;

    /// What a TLS connection is made with: built once per engine, from the URL.
    #[derive(Clone)]
    pub(crate) struct TlsSettings {
        connector: SslConnector,
    }

    impl TlsSettings {
        pub(crate) fn new(options: &TlsOptions) -> Result<TlsSettings, Error> {
            let mut builder = SslConnector::builder(SslMethod::tls_client())
                .and_then(|mut builder| {
                    builder.set_min_proto_version(Some(SslVersion::TLS1_2))?;
                    Ok(builder)
                })
                .map_err(|err| invalid(format!("TLS setup: {err}")))?;
            match &options.ca {
                Some(ca) => builder
                    .set_ca_file(ca)
                    .map_err(|err| invalid(format!("TLS: cannot load ca={ca}: {err}")))?,
                None => trust_system_store(&mut builder),
            }
            if let (Some(cert), Some(key)) = (&options.cert, &options.key) {
                builder
                    .set_certificate_chain_file(cert)
                    .map_err(|err| invalid(format!("TLS: cannot load cert={cert}: {err}")))?;
                builder
                    .set_private_key_file(key, SslFiletype::PEM)
                    .and_then(|()| builder.check_private_key())
                    .map_err(|err| invalid(format!("TLS: cannot load key={key}: {err}")))?;
            }
            Ok(TlsSettings {
                connector: builder.build(),
            })
        }
    }

    /// The system's trust store. A vendored OpenSSL looks in its own build prefix, which does
    /// not exist on the machine it runs on; openssl-probe knows where distributions keep
    /// theirs (and honours `SSL_CERT_FILE` / `SSL_CERT_DIR`). A store that cannot be found
    /// is not an error here: the handshake then fails with the verification error.
    fn trust_system_store(builder: &mut SslConnectorBuilder) {
        let found = openssl_probe::probe();
        let _ =
            builder.load_verify_locations(found.cert_file.as_deref(), found.cert_dir.as_deref());
    }

    /// Starts a handshake on a connected socket; `host` is what the certificate must name.
    pub(crate) fn connect(
        settings: &TlsSettings,
        host: &str,
        stream: TcpStream,
    ) -> Result<Transport, Error> {
        let ssl = settings
            .connector
            .configure()
            .and_then(|config| config.into_ssl(host))
            .map_err(|err| Error::Unreachable(format!("TLS setup for {host}: {err}")))?;
        finish(ssl.connect(stream))
    }

    pub(crate) fn resume(handshake: MidHandshakeSslStream<TcpStream>) -> Result<Transport, Error> {
        finish(handshake.handshake())
    }

    fn finish(
        step: Result<SslStream<TcpStream>, HandshakeError<TcpStream>>,
    ) -> Result<Transport, Error> {
        match step {
            Ok(stream) => Ok(Transport::Tls(stream)),
            Err(HandshakeError::WouldBlock(handshake)) => Ok(Transport::Handshaking(handshake)),
            Err(HandshakeError::SetupFailure(err)) => {
                Err(Error::Unreachable(format!("TLS setup: {err}")))
            }
            Err(HandshakeError::Failure(handshake)) => {
                let verify = handshake.ssl().verify_result();
                let reason = if verify == X509VerifyResult::OK {
                    handshake.error().to_string()
                } else {
                    format!("the server's certificate: {}", verify.error_string())
                };
                Err(Error::Unreachable(format!("TLS handshake: {reason}")))
            }
        }
    }
}

#[cfg(feature = "tls")]
pub(crate) use openssl_tls::TlsSettings;

#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub(crate) struct TlsSettings;

#[cfg(not(feature = "tls"))]
impl TlsSettings {
    pub(crate) fn new(_options: &TlsOptions) -> Result<TlsSettings, Error> {
        Err(Error::NotSupported("TLS (the tls feature)"))
    }
}

/// `Error::InvalidArgument` holds a `&'static str`; a setup message names a file, so it is
/// leaked: once per failed enable, a few bytes the host asked for.
#[cfg(feature = "tls")]
fn invalid(message: String) -> Error {
    Error::InvalidArgument(Box::leak(message.into_boxed_str()))
}

/// The byte stream under a protocol.
pub(crate) enum Transport {
    /// What is left for an instant while a handshake step takes the stream by value.
    Closed,
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Handshaking(openssl::ssl::MidHandshakeSslStream<TcpStream>),
    #[cfg(feature = "tls")]
    Tls(openssl::ssl::SslStream<TcpStream>),
}

impl Transport {
    /// Starts TLS on a connected plain socket; `host` is what the certificate must name.
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    pub(crate) fn start_tls(self, settings: &TlsSettings, host: &str) -> Result<Transport, Error> {
        match self {
            #[cfg(feature = "tls")]
            Transport::Plain(stream) => openssl_tls::connect(settings, host, stream),
            #[cfg(not(feature = "tls"))]
            Transport::Plain(_) => Err(Error::NotSupported("TLS (the tls feature)")),
            other => Ok(other),
        }
    }

    /// Moves a handshake along (call when the socket is ready).
    pub(crate) fn advance(self) -> Result<Transport, Error> {
        match self {
            #[cfg(feature = "tls")]
            Transport::Handshaking(handshake) => openssl_tls::resume(handshake),
            other => Ok(other),
        }
    }

    /// The address the connection reached.
    #[cfg(feature = "redis")]
    pub(crate) fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Transport::Closed => None,
            Transport::Plain(stream) => stream.peer_addr().ok(),
            #[cfg(feature = "tls")]
            Transport::Handshaking(handshake) => handshake.get_ref().peer_addr().ok(),
            #[cfg(feature = "tls")]
            Transport::Tls(stream) => stream.get_ref().peer_addr().ok(),
        }
    }

    /// Bytes can flow (no handshake in progress).
    pub(crate) fn is_ready(&self) -> bool {
        match self {
            Transport::Plain(_) => true,
            #[cfg(feature = "tls")]
            Transport::Tls(_) => true,
            _ => false,
        }
    }
}

impl AsRawFd for Transport {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Transport::Closed => -1,
            Transport::Plain(stream) => stream.as_raw_fd(),
            #[cfg(feature = "tls")]
            Transport::Handshaking(handshake) => handshake.get_ref().as_raw_fd(),
            #[cfg(feature = "tls")]
            Transport::Tls(stream) => stream.get_ref().as_raw_fd(),
        }
    }
}

/// Only called when `is_ready`; a handshake in progress reads and writes nothing.
impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Closed => Err(io::ErrorKind::NotConnected.into()),
            Transport::Plain(stream) => stream.read(buf),
            #[cfg(feature = "tls")]
            Transport::Handshaking(_) => Err(io::ErrorKind::WouldBlock.into()),
            #[cfg(feature = "tls")]
            Transport::Tls(stream) => stream.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Closed => Err(io::ErrorKind::NotConnected.into()),
            Transport::Plain(stream) => stream.write(buf),
            #[cfg(feature = "tls")]
            Transport::Handshaking(_) => Err(io::ErrorKind::WouldBlock.into()),
            #[cfg(feature = "tls")]
            Transport::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
