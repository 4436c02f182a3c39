//! The health gate of `mark-good`: a slot on trial is only marked good once the daemon it runs
//! answers its health endpoint. A minimal HTTP/1.1 GET over a `TcpStream` is all that needs:
//! it runs early in boot, on loopback, and must not depend on the runtime it is judging.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The daemon's own health endpoint on the box.
pub const DEFAULT_HEALTH_URL: &str = "http://127.0.0.1:8080/health";
/// How long a trial boot may take to become healthy before it counts as failed.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// Pause between attempts.
const POLL: Duration = Duration::from_secs(1);
/// Longest a single attempt may take (connect, and each read or write).
const TRY_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest time an attempt gets, even right at the deadline.
const MIN_TRY: Duration = Duration::from_secs(1);
/// A health answer is small; reading stops here.
const MAX_RESPONSE: usize = 64 * 1024;

/// An `http://host[:port]/path` URL, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("health URL {url:?}: only http:// is supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let bad_port = |p: &str| format!("health URL {url:?}: bad port {p:?}");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, tail) = v6
                .split_once(']')
                .with_context(|| format!("health URL {url:?}: unclosed ["))?;
            match tail.strip_prefix(':') {
                Some(p) => (h, p.parse::<u16>().with_context(|| bad_port(p))?),
                None if tail.is_empty() => (h, 80),
                None => bail!("health URL {url:?}: junk after ]"),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse::<u16>().with_context(|| bad_port(p))?),
                None => (authority, 80),
            }
        };
        if host.is_empty() {
            bail!("health URL {url:?}: no host");
        }
        Ok(HttpUrl {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// One GET; returns the response's status code. Every step is bounded by `timeout`.
pub fn get_status(url: &HttpUrl, timeout: Duration) -> Result<u16> {
    let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", url.host))?
        .collect();
    let addr = addrs
        .first()
        .with_context(|| format!("{} resolves to no address", url.host))?;
    let mut s = TcpStream::connect_timeout(addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: edgelorad-update\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n",
        url.path,
        url.host_header()
    );
    s.write_all(req.as_bytes()).context("sending the request")?;
    let line = read_status_line(&mut s)?;
    parse_status_line(&line)
}

/// Reads the response to its end (the server closes it, or its `Content-Length` body is in),
/// at most `MAX_RESPONSE` bytes, and returns the status line. Reading it all, rather than just
/// the first line, avoids closing a socket with unread data, which resets the connection under
/// a server still writing.
fn read_status_line(s: &mut TcpStream) -> Result<String> {
    let mut resp = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                resp.extend_from_slice(&buf[..n]);
                if resp.len() >= MAX_RESPONSE || complete(&resp) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A server that keeps the connection open anyway: the status is what counts.
            Err(e)
                if resp.contains(&b'\n')
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                break;
            }
            Err(e) => return Err(e).context("reading the response"),
        }
    }
    let Some(end) = resp.iter().position(|&b| b == b'\n') else {
        bail!("no HTTP status line in the {} bytes received", resp.len());
    };
    Ok(String::from_utf8_lossy(&resp[..end]).trim_end().to_string())
}

/// Whether `resp` holds the whole head and as much body as its `Content-Length` says.
fn complete(resp: &[u8]) -> bool {
    let Some(head_end) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&resp[..head_end]);
    let length = head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    length.is_some_and(|n| resp.len() >= head_end + 4 + n)
}

/// `HTTP/1.1 200 OK` -> 200.
fn parse_status_line(line: &str) -> Result<u16> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code
            .parse()
            .with_context(|| format!("bad status line {line:?}")),
        _ => bail!("not an HTTP response: {line:?}"),
    }
}

/// Polls `url` once a second until it answers 200, or fails after `timeout` with the last
/// reason it was not healthy. Each change of reason is logged, so the journal shows why.
pub fn wait_healthy(url: &str, timeout: Duration) -> Result<()> {
    let parsed = HttpUrl::parse(url)?;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // The last try may overrun the deadline by MIN_TRY rather than not happen at all.
        let why = match get_status(&parsed, TRY_TIMEOUT.min(left).max(MIN_TRY)) {
            Ok(200) => return Ok(()),
            Ok(code) => format!("it answered HTTP {code}"),
            Err(e) => format!("{e:#}"),
        };
        if why != last {
            eprintln!("{url} is not healthy yet: {why}");
            last = why;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "{url} was not healthy within {}s (last: {last}); not marking this slot good, so \
                 the boot counts as failed",
                timeout.as_secs()
            );
        }
        std::thread::sleep(POLL.min(left));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/health").unwrap();
        assert_eq!(
            u,
            HttpUrl {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/health".into()
            }
        );
        let u = HttpUrl::parse("http://localhost").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = HttpUrl::parse("http://[::1]:9/h?x=1").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert_eq!(HttpUrl::parse("http://[::1]/").unwrap().port, 80);
        assert!(HttpUrl::parse("https://x/").is_err());
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK").unwrap(), 200);
        assert_eq!(parse_status_line("HTTP/1.0 503").unwrap(), 503);
        assert!(parse_status_line("SSH-2.0").is_err());
    }

    #[test]
    fn response_completeness() {
        assert!(!complete(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"));
        assert!(!complete(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no"));
        assert!(complete(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"));
        // Without a length the end is the server closing.
        assert!(!complete(b"HTTP/1.1 200 OK\r\n\r\nok"));
    }
}
