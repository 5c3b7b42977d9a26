//! A minimal HTTP/1.1 client for one thing: POST a report to a collector and read the
//! status. Plain `http://` over `std::net::TcpStream`, `Connection: close`, no TLS, no
//! redirects, no dependencies: the runner ships it to every device (ARCHITECTURE.md says
//! why not a general HTTP crate).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Where reports go when the URL names no path.
pub const DEFAULT_PATH: &str = "/v1/reports";

/// The most of a response this client reads (status line, headers and a short reason).
const MAX_RESPONSE: u64 = 64 * 1024;

/// A parsed `http://HOST[:PORT][/PATH]` collector URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address (brackets kept for IPv6 literals).
    pub host: String,
    /// TCP port (80 when not given).
    pub port: u16,
    /// Request path, [`DEFAULT_PATH`] when the URL has none.
    pub path: String,
}

impl Endpoint {
    /// Parses a collector URL; only plain `http://` is supported.
    pub fn parse(url: &str) -> Result<Endpoint> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => bail!(
                "collector URL `{url}`: https is not supported by the runner's client (no TLS on the device); use http:// on a trusted network or a local TLS-terminating proxy"
            ),
            Some((scheme, _)) => bail!("collector URL `{url}`: unsupported scheme `{scheme}` (use http://HOST:PORT)"),
            None => bail!("collector URL `{url}` lacks `http://` (use http://HOST:PORT)"),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            bail!("collector URL `{url}`: expected http://HOST[:PORT][/PATH]");
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .with_context(|| format!("collector URL `{url}`: bad port `{p}`"))?;
                (h.to_string(), port)
            }
            _ => (authority.to_string(), 80),
        };
        let path = if path.is_empty() || path == "/" {
            DEFAULT_PATH.to_string()
        } else {
            path.to_string()
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            bail!("collector URL `{url}`: the path holds spaces or control characters");
        }
        Ok(Endpoint { host, port, path })
    }

    /// `http://host:port/path`, for messages.
    pub fn url(&self) -> String {
        format!("http://{}:{}{}", self.host, self.port, self.path)
    }
}

/// A collector's answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The body (at most 64 KiB of it), lossily decoded.
    pub body: String,
}

impl Response {
    /// True for 2xx: the collector has the report (stored now or before).
    pub fn delivered(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// POSTs `body` as JSON to `endpoint` with an `Idempotency-Key` header; `timeout` bounds
/// connecting and each read or write. A connection failure is an error; any HTTP status
/// is a [`Response`].
pub fn post(endpoint: &Endpoint, body: &[u8], key: &str, timeout: Duration) -> Result<Response> {
    let addrs: Vec<_> = (endpoint.host.trim_matches(['[', ']']), endpoint.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve collector host `{}`", endpoint.host))?
        .collect();
    let mut last = None;
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = match (stream, last) {
        (Some(s), _) => s,
        (None, Some(e)) => {
            return Err(e).with_context(|| format!("cannot connect to {}", endpoint.url()))
        }
        (None, None) => bail!("collector host `{}` has no address", endpoint.host),
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nIdempotency-Key: {}\r\nUser-Agent: kiln-runner/{}\r\nConnection: close\r\n\r\n",
        endpoint.path,
        endpoint.host,
        endpoint.port,
        body.len(),
        key,
        env!("CARGO_PKG_VERSION"),
    );
    let sent = stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body))
        .and_then(|_| stream.flush());
    let mut raw = vec![];
    let read = stream.take(MAX_RESPONSE).read_to_end(&mut raw);
    // A server may answer (413) and close before reading the whole body: its answer counts.
    let response = parse_response(&raw);
    match (response, sent, read) {
        (Some(r), _, _) => Ok(r),
        (None, Err(e), _) | (None, Ok(()), Err(e)) => {
            Err(e).with_context(|| format!("talking to {} failed", endpoint.url()))
        }
        (None, Ok(()), Ok(_)) => bail!(
            "{} sent no valid HTTP response ({} bytes)",
            endpoint.url(),
            raw.len()
        ),
    }
}

/// Parses `HTTP/1.x CODE REASON\r\n...\r\n\r\nBODY`; None when there is no status line.
fn parse_response(raw: &[u8]) -> Option<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    Some(Response {
        status,
        body: body.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let e = Endpoint::parse("http://10.0.0.2:7878").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("10.0.0.2", 7878, DEFAULT_PATH)
        );
        let e = Endpoint::parse("http://collector/custom/in").unwrap();
        assert_eq!((e.port, e.path.as_str()), (80, "/custom/in"));
        let e = Endpoint::parse("http://[::1]:9000/").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("[::1]", 9000));
        for bad in [
            "https://x",
            "ftp://x",
            "x:80",
            "http://",
            "http://h:0",
            "http://h:99999",
            "http://u@h",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
        assert!(format!("{:#}", Endpoint::parse("https://x").unwrap_err()).contains("TLS"));
    }

    #[test]
    fn parses_responses() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok").unwrap();
        assert_eq!((r.status, r.body.as_str()), (201, "ok"));
        assert!(r.delivered());
        assert!(!parse_response(b"HTTP/1.1 413 x\r\n\r\n")
            .unwrap()
            .delivered());
        assert!(parse_response(b"garbage\r\n\r\n").is_none());
        assert!(parse_response(b"HTTP/1.1 200 OK").is_none());
    }

    #[test]
    fn refused_connection_is_an_error() {
        // Bind then drop: nothing listens on that port now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let err = post(&e, b"{}", "k", Duration::from_secs(2)).unwrap_err();
        assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
    }
}
