//! The smallest HTTP/1.1 client the webhook sender needs: one `POST` per connection,
//! over TCP or TLS (tokio-rustls with the workspace's one crypto provider, ring), and
//! only the status line of the answer is read.
//!
//! Owns: URL parsing (http and https only, no user info, at most 2,048 bytes), the
//! TLS client configuration (the system's CA bundle, or one CA given per target for
//! receivers behind a private CA, as air-gapped sites have), and the bounds of one
//! exchange: the caller's deadline covers DNS, connect, TLS, sending and the answer's
//! head, which may be at most 16 KiB. It knows nothing of events or signatures.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// Longest URL accepted.
const MAX_URL_LEN: usize = 2048;
/// Most bytes of an answer read before its head must have ended.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Where Linux distributions keep the system CA bundle, in the order tried (after
/// `SSL_CERT_FILE`): Debian and Ubuntu, Fedora and RHEL, openSUSE, Alpine.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Why a URL is refused; each says how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("the URL is longer than {MAX_URL_LEN} bytes")]
    TooLong,
    #[error("the URL has spaces, control or non-ASCII characters; percent-encode them")]
    Characters,
    #[error("{0:?} is not an http:// or https:// URL")]
    Scheme(String),
    #[error(
        "user names and passwords in the URL are not supported; the signature authenticates Gantry"
    )]
    UserInfo,
    #[error("an IPv6 address must be written [addr]:port")]
    Ipv6Brackets,
    #[error("junk after the IPv6 address")]
    Ipv6Junk,
    #[error("{0:?} is not an IPv6 address")]
    Ipv6(String),
    #[error("{0:?} is not a host name or address")]
    Host(String),
    #[error("{0:?} is not a port number")]
    Port(String),
}

/// Why a TLS client configuration cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsConfigError {
    #[error("the CA file is not PEM certificates: {0}")]
    NotPem(String),
    #[error("the CA file holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate,
    #[error("a certificate in the CA file cannot be a trust anchor: {0}")]
    NotAnchor(String),
    #[error("no system CA bundle (tried SSL_CERT_FILE and {}); install ca-certificates or add the webhook with --ca FILE", SYSTEM_BUNDLES.join(", "))]
    NoSystemBundle,
    #[error("the system CA bundle {0} holds no usable certificate")]
    EmptySystemBundle(String),
    #[error("{0}")]
    Rustls(String),
}

/// Why one `POST` got no status; the delivery log shows it as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    #[error("cannot connect to {host}:{port}: {detail}")]
    Connect {
        host: String,
        port: u16,
        detail: String,
    },
    #[error("no TLS configuration for an https URL")]
    NoTls,
    #[error("{host:?} cannot be checked against a certificate: {detail}")]
    ServerName { host: String, detail: String },
    #[error("TLS with {host}: {detail}")]
    Tls { host: String, detail: String },
    #[error("no answer within {} s", .0.as_secs_f32())]
    Timeout(Duration),
    #[error("sending to {host}: {detail}")]
    Send { host: String, detail: String },
    #[error("the answer's head is longer than {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLong,
    #[error("reading the answer from {host}: {detail}")]
    Read { host: String, detail: String },
    #[error("{0} closed the connection without an answer")]
    Closed(String),
    #[error("not an HTTP answer: {0:?}")]
    NotHttp(String),
}

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    /// Host name or address, without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        if text.len() > MAX_URL_LEN {
            return Err(UrlError::TooLong);
        }
        if text
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || !b.is_ascii())
        {
            return Err(UrlError::Characters);
        }
        let (tls, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(UrlError::Scheme(text.chars().take(80).collect()));
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(UrlError::UserInfo);
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(UrlError::Ipv6Brackets)?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(UrlError::Ipv6Junk),
            };
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| UrlError::Ipv6(host.to_owned()))?;
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
        if !valid_host {
            return Err(UrlError::Host(host.to_owned()));
        }
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| UrlError::Port(p.to_owned()))?,
        };
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// The `Host` header value.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.tls, self.port) {
            (true, 443) | (false, 80) => host,
            (_, port) => format!("{host}:{port}"),
        }
    }
}

/// CA certificates (DER) from PEM text; an error if there are none or one is bad.
pub fn parse_ca_pem(
    pem: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsConfigError> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::NotPem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate);
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots
            .add(cert.clone())
            .map_err(|e| TlsConfigError::NotAnchor(e.to_string()))?;
    }
    Ok(certs)
}

fn client_config(
    roots: rustls::RootCertStore,
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let config = rustls::ClientConfig::builder_with_provider(gantry_certs::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError::Rustls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A TLS configuration trusting only the CAs in `pem`.
pub fn tls_with_ca(pem: &str) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_ca_pem(pem)? {
        roots
            .add(cert)
            .map_err(|e| TlsConfigError::Rustls(e.to_string()))?;
    }
    client_config(roots)
}

/// The TLS configuration trusting the system's CA bundle, read once.
pub fn tls_with_system_roots() -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    static SYSTEM: OnceLock<Result<Arc<rustls::ClientConfig>, TlsConfigError>> = OnceLock::new();
    SYSTEM
        .get_or_init(|| {
            use rustls::pki_types::pem::PemObject as _;
            let candidates: Vec<std::path::PathBuf> = std::env::var_os("SSL_CERT_FILE")
                .map(std::path::PathBuf::from)
                .into_iter()
                .chain(SYSTEM_BUNDLES.iter().map(std::path::PathBuf::from))
                .collect();
            let (path, pem) = candidates
                .iter()
                .find_map(|p| std::fs::read_to_string(p).ok().map(|t| (p, t)))
                .ok_or(TlsConfigError::NoSystemBundle)?;
            let mut roots = rustls::RootCertStore::empty();
            let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
                .filter_map(Result::ok);
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsConfigError::EmptySystemBundle(
                    path.display().to_string(),
                ));
            }
            client_config(roots)
        })
        .clone()
}

/// Sends one `POST` and returns the answer's status code. `tls` is required for an
/// https URL. The whole exchange must finish within `deadline`.
pub async fn post(
    url: &Url,
    tls: Option<Arc<rustls::ClientConfig>>,
    headers: &[(&str, String)],
    body: &[u8],
    deadline: Duration,
) -> Result<u16, PostError> {
    let exchange = async {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| PostError::Connect {
                host: url.host.clone(),
                port: url.port,
                detail: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        if url.tls {
            let config = tls.ok_or(PostError::NoTls)?;
            let name = rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|e| {
                PostError::ServerName {
                    host: url.host.clone(),
                    detail: e.to_string(),
                }
            })?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| PostError::Tls {
                    host: url.host.clone(),
                    detail: e.to_string(),
                })?;
            exchange(stream, url, headers, body).await
        } else {
            exchange(tcp, url, headers, body).await
        }
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| PostError::Timeout(deadline))?
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    url: &Url,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<u16, PostError> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: gantry/{}\r\n",
        url.path,
        url.host_header(),
        body.len(),
        env!("CARGO_PKG_VERSION")
    );
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let io = |e: std::io::Error| PostError::Send {
        host: url.host.clone(),
        detail: e.to_string(),
    };
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(body).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut buf = Vec::with_capacity(1024);
    let mut piece = [0u8; 2048];
    loop {
        if let Some(status) = parse_status(&buf)? {
            return Ok(status);
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(PostError::HeadTooLong);
        }
        let n = stream.read(&mut piece).await.map_err(|e| PostError::Read {
            host: url.host.clone(),
            detail: e.to_string(),
        })?;
        if n == 0 {
            return Err(PostError::Closed(url.host.clone()));
        }
        buf.extend_from_slice(&piece[..n]);
    }
}

/// The status code of an answer once its status line is complete.
fn parse_status(buf: &[u8]) -> Result<Option<u16>, PostError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = String::from_utf8_lossy(&buf[..end]);
    let mut parts = line.split(' ');
    match (
        parts.next(),
        parts.next().and_then(|s| s.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") && (100..=999).contains(&code) => {
            Ok(Some(code))
        }
        _ => Err(PostError::NotHttp(line.chars().take(80).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        let u = Url::parse("https://hooks.example.net/services/T0/B0/x?y=1#frag").expect("ok");
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "hooks.example.net", 443, "/services/T0/B0/x?y=1")
        );
        assert_eq!(u.host_header(), "hooks.example.net");
        let u = Url::parse("http://10.0.0.7:8080").expect("ok");
        assert_eq!((u.tls, u.port, u.path.as_str()), (false, 8080, "/"));
        assert_eq!(u.host_header(), "10.0.0.7:8080");
        let u = Url::parse("http://[::1]:9/h").expect("ok");
        assert_eq!(
            (u.host.as_str(), u.host_header().as_str()),
            ("::1", "[::1]:9")
        );
        let u = Url::parse("http://h?q=1").expect("ok");
        assert_eq!(u.path, "/?q=1");
        for bad in [
            "ftp://x/",
            "hooks.example.net/x",
            "http://",
            "http://user:pw@host/",
            "http://host:0/",
            "http://host:99999/",
            "http://ho st/",
            "http://[::1/",
            "http://[zz]:1/",
            "http://h\u{e9}/",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
        assert!(Url::parse(&format!("http://h/{}", "a".repeat(MAX_URL_LEN))).is_err());
    }

    #[test]
    fn status_lines_parse_when_complete() {
        assert_eq!(parse_status(b"HTTP/1.1 20"), Ok(None));
        assert_eq!(parse_status(b"HTTP/1.1 204 No Content\r\n"), Ok(Some(204)));
        assert_eq!(parse_status(b"HTTP/1.0 500\r\n"), Ok(Some(500)));
        assert!(parse_status(b"SSH-2.0-OpenSSH\r\n").is_err());
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        assert!(parse_ca_pem("").is_err());
        assert!(parse_ca_pem("not pem").is_err());
        let ca =
            gantry_certs::CertAuthority::create("test", std::time::SystemTime::now()).expect("ca");
        assert_eq!(parse_ca_pem(ca.cert_pem()).expect("one").len(), 1);
        assert!(tls_with_ca(ca.cert_pem()).is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_post_returns_the_status_and_a_silent_receiver_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"hello") {
                let n = sock.read(&mut buf).await.expect("read");
                assert!(
                    n > 0,
                    "request cut short: {:?}",
                    String::from_utf8_lossy(&got)
                );
                got.extend_from_slice(&buf[..n]);
            }
            sock.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .await
                .expect("write");
            // Then a second connection that never answers.
            let (_silent, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(5)).await;
            String::from_utf8_lossy(&got).into_owned()
        });
        let url = Url::parse(&format!("http://{addr}/hook")).expect("url");
        let status = post(
            &url,
            None,
            &[("X-Test", "1".into())],
            b"hello",
            Duration::from_secs(5),
        )
        .await
        .expect("post");
        assert_eq!(status, 202);
        let started = std::time::Instant::now();
        let err = post(&url, None, &[], b"hello", Duration::from_millis(200))
            .await
            .expect_err("silent");
        assert!(err.to_string().contains("no answer within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        server.abort();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn https_trusts_the_given_ca_and_refuses_another() {
        let now = std::time::SystemTime::now();
        let ca = gantry_certs::CertAuthority::create("receiver CA", now).expect("ca");
        let (cert, key) = ca
            .issue_coordinator(&["127.0.0.1".into()], now)
            .expect("cert");
        let config = gantry_certs::ServerTls::https(ca.cert_der(), &cert.pem, &key).expect("tls");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.expect("accept");
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    continue;
                };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                let _ = tls.shutdown().await;
            }
        });
        let url = Url::parse(&format!("https://{addr}/hook")).expect("url");
        let trusted = tls_with_ca(ca.cert_pem()).expect("config");
        let status = post(&url, Some(trusted), &[], b"{}", Duration::from_secs(5))
            .await
            .expect("delivered over TLS");
        assert_eq!(status, 204);
        let other = gantry_certs::CertAuthority::create("another CA", now).expect("ca");
        let err = post(
            &url,
            Some(tls_with_ca(other.cert_pem()).expect("config")),
            &[],
            b"{}",
            Duration::from_secs(5),
        )
        .await
        .expect_err("another CA");
        assert!(err.to_string().contains("TLS"), "{err}");
        server.abort();
    }
}
