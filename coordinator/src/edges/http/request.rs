//! An HTTP/1.1 request, read within explicit bounds: 16 KiB of headers, 1 MiB of body.
//! One request per connection (`Connection: close`), so nothing here keeps a
//! connection's state.

use tokio::io::{AsyncRead, AsyncReadExt};

pub const MAX_HEADER_BYTES: usize = 16 * 1024;
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read; each maps to a status code.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("headers larger than {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    #[error("body larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("connection closed before the request was complete")]
    Incomplete,
}

/// Parses a request from `buf` if it is complete: `Ok(None)` means read more.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, RequestError> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEADER_BYTES {
            Err(RequestError::HeadersTooLarge)
        } else {
            Ok(None)
        };
    };
    if head_end > MAX_HEADER_BYTES {
        return Err(RequestError::HeadersTooLarge);
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| RequestError::Malformed("headers are not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed(format!(
            "bad request line {request_line:?}"
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(RequestError::Malformed(format!(
            "unsupported version {version:?}"
        )));
    }
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| RequestError::Malformed(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let length = match headers.iter().find(|(k, _)| k == "content-length") {
        Some((_, v)) => v
            .parse::<usize>()
            .map_err(|_| RequestError::Malformed("bad Content-Length".into()))?,
        None => 0,
    };
    if length > MAX_BODY_BYTES {
        return Err(RequestError::BodyTooLarge);
    }
    let body_start = head_end + 4;
    if buf.len() < body_start + length {
        return Ok(None);
    }
    Ok(Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body: buf[body_start..body_start + length].to_vec(),
    }))
}

/// Reads one request from `stream`.
pub async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Request, RequestError> {
    let mut buf = Vec::with_capacity(4096);
    let mut piece = [0u8; 8192];
    loop {
        if let Some(req) = parse_request(&buf)? {
            return Ok(req);
        }
        let n = stream
            .read(&mut piece)
            .await
            .map_err(|e| RequestError::Malformed(e.to_string()))?;
        if n == 0 {
            return Err(RequestError::Incomplete);
        }
        buf.extend_from_slice(&piece[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_incrementally_and_limits_hold() {
        let raw = b"POST /hooks/push HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-Hub-Signature-256: sha256=ab\r\n\r\nhello";
        for cut in 0..raw.len() {
            assert_eq!(parse_request(&raw[..cut]), Ok(None), "incomplete at {cut}");
        }
        let req = parse_request(raw).expect("ok").expect("complete");
        assert_eq!(
            (req.method.as_str(), req.path.as_str(), req.body.as_slice()),
            ("POST", "/hooks/push", &b"hello"[..])
        );
        assert_eq!(req.header("x-hub-signature-256"), Some("sha256=ab"));
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(
            parse_request(big.as_bytes()),
            Err(RequestError::BodyTooLarge)
        );
        assert_eq!(
            parse_request(&vec![b'a'; MAX_HEADER_BYTES + 1]),
            Err(RequestError::HeadersTooLarge)
        );
        assert!(matches!(
            parse_request(b"GARBAGE\r\n\r\n"),
            Err(RequestError::Malformed(_))
        ));
        assert!(matches!(
            parse_request(b"GET / SPDY/3\r\n\r\n"),
            Err(RequestError::Malformed(_))
        ));
    }
}
