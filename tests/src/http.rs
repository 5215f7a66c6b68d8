//! Plain HTTP/1.1 exchanges with the coordinator's HTTP side on loopback, and reading
//! `/metrics`: what several end-to-end tests need, written once.

use std::io::{Read, Write};
use std::time::Duration;

/// A response, read until the server closed the connection.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// One HTTP exchange on a fresh connection: sends `request` as is.
pub fn exchange(addr: &str, request: &[u8]) -> Response {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request).expect("write");
    let mut response = String::new();
    // A server that refuses a request may close before reading all of it; what it sent
    // is still in `response`.
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Response {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

pub fn get(addr: &str, path: &str) -> Response {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: gantry\r\n\r\n").as_bytes(),
    )
}

/// The value of the counter or gauge `name` (a whole series, labels included), checking
/// every exposition line's shape on the way.
pub fn metric(text: &str, name: &str) -> u64 {
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not `series value`: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of {line:?} is not a number"));
        let metric_name = series.split('{').next().unwrap_or_default();
        assert!(
            metric_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "bad metric name in {line:?}"
        );
        if series == name {
            assert!(
                value.fract() == 0.0 && value >= 0.0,
                "{name} is a count: {line:?}"
            );
            return value as u64;
        }
    }
    panic!("no series {name} in:\n{text}");
}
