//! Health checks of a deployed app: HTTP, TCP and command probes, and the rule that
//! turns a series of probes into healthy or not.
//!
//! The rule: probe every `interval`; the app is healthy once probes pass without a break
//! for `min_healthy`; `retries` failed probes in a row, or no healthy verdict by
//! `deadline`, make it unhealthy. The verdict function is pure ([`Verdict::next`]); the
//! probes do the I/O, each bounded by `timeout`.

use std::time::Duration;

use gantry_protocol::{HealthCheck, Probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Most bytes of an HTTP answer read to check it.
const MAX_HTTP_ANSWER: usize = 64 * 1024;

/// Where a series of probes stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Milliseconds (since the check began) when the current run of passes began.
    streak_since: Option<u64>,
    failures_in_a_row: u32,
}

/// What the rule says after a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Healthy,
    Unhealthy,
    ProbeAgain,
}

impl Verdict {
    pub fn new() -> Self {
        Self {
            streak_since: None,
            failures_in_a_row: 0,
        }
    }

    /// Takes one probe's result at `elapsed_ms` since the check began.
    pub fn next(&mut self, check: &HealthCheck, elapsed_ms: u64, passed: bool) -> Next {
        if passed {
            self.failures_in_a_row = 0;
            let since = *self.streak_since.get_or_insert(elapsed_ms);
            if elapsed_ms - since >= check.min_healthy_ms {
                return Next::Healthy;
            }
        } else {
            self.streak_since = None;
            self.failures_in_a_row += 1;
            if self.failures_in_a_row > check.retries {
                return Next::Unhealthy;
            }
        }
        if elapsed_ms >= check.deadline_ms {
            Next::Unhealthy
        } else {
            Next::ProbeAgain
        }
    }
}

impl Default for Verdict {
    fn default() -> Self {
        Self::new()
    }
}

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("{address}: no connection within {timeout:?}")]
    ConnectTimeout { address: String, timeout: Duration },
    #[error("{url}: only http:// URLs are probed")]
    NotHttpUrl { url: String },
    #[error("{url}: {source}")]
    Http { url: String, source: std::io::Error },
    #[error("{url}: no answer within {timeout:?}")]
    HttpTimeout { url: String, timeout: Duration },
    #[error("{url}: not an HTTP answer")]
    NotHttpAnswer { url: String },
    #[error("{url}: status {status}, expected {expected}")]
    Status {
        url: String,
        status: u16,
        expected: u16,
    },
    #[error("{url}: the body does not contain {body:?}")]
    Body { url: String, body: String },
    #[error("the command did not finish within {0:?}")]
    CommandTimeout(Duration),
    #[error("the check exited with {code}: {last_line}")]
    CommandExit { code: i32, last_line: String },
    /// The command probe could not run at all.
    #[error(transparent)]
    Command(Box<dyn std::error::Error + Send + Sync>),
}

/// The check's verdict was "unhealthy".
#[derive(Debug, thiserror::Error)]
#[error("unhealthy after {elapsed_secs:.1} s: {}", last.as_ref().map_or_else(|| "not healthy for long enough".to_owned(), ToString::to_string))]
pub struct Unhealthy {
    pub elapsed_secs: f64,
    /// The last probe's failure; `None` when probes passed but not for long enough.
    pub last: Option<ProbeError>,
}

/// Runs the check until a verdict. `fill` fills in `${{ labels.X }}` and
/// `${{ slot.port }}` in URLs and addresses; `run_command` runs a command probe.
pub async fn check<F, Fut>(
    check: &HealthCheck,
    fill: &(dyn Fn(&str) -> String + Sync),
    run_command: F,
) -> Result<(), Unhealthy>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), ProbeError>>,
{
    let started = tokio::time::Instant::now();
    let mut verdict = Verdict::new();
    let timeout = Duration::from_millis(check.timeout_ms);
    loop {
        let result = match &check.probe {
            Probe::Http { url, status, body } => {
                http_probe(&fill(url), *status, body.as_deref(), timeout).await
            }
            Probe::Tcp { address } => tcp_probe(&fill(address), timeout).await,
            Probe::Command { run } => {
                match tokio::time::timeout(timeout, run_command(run.clone())).await {
                    Ok(r) => r,
                    Err(_) => Err(ProbeError::CommandTimeout(timeout)),
                }
            }
        };
        let elapsed = started.elapsed().as_millis() as u64;
        match verdict.next(check, elapsed, result.is_ok()) {
            Next::Healthy => return Ok(()),
            Next::Unhealthy => {
                return Err(Unhealthy {
                    elapsed_secs: elapsed as f64 / 1000.0,
                    last: result.err(),
                });
            }
            Next::ProbeAgain => {
                tokio::time::sleep(Duration::from_millis(check.interval_ms)).await;
            }
        }
    }
}

async fn tcp_probe(address: &str, timeout: Duration) -> Result<(), ProbeError> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(ProbeError::Connect {
            address: address.to_owned(),
            source,
        }),
        Err(_) => Err(ProbeError::ConnectTimeout {
            address: address.to_owned(),
            timeout,
        }),
    }
}

/// `GET` over HTTP/1.0 (the server closes the connection), checking the status and,
/// if asked, that the body contains `body`.
async fn http_probe(
    url: &str,
    want_status: u16,
    want_body: Option<&str>,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ProbeError::NotHttpUrl {
            url: url.to_owned(),
        })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let address = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let http = |source| ProbeError::Http {
        url: url.to_owned(),
        source,
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&address)
            .await
            .map_err(http)?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: gantry-agent\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(http)?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(MAX_HTTP_ANSWER as u64)
            .read_to_end(&mut answer)
            .await
            .map_err(http)?;
        Ok::<_, ProbeError>(answer)
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ProbeError::HttpTimeout {
            url: url.to_owned(),
            timeout,
        })??;
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ProbeError::NotHttpAnswer {
            url: url.to_owned(),
        })?;
    if status != want_status {
        return Err(ProbeError::Status {
            url: url.to_owned(),
            status,
            expected: want_status,
        });
    }
    if let Some(body) = want_body {
        let content = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        if !content.contains(body) {
            return Err(ProbeError::Body {
                url: url.to_owned(),
                body: body.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(retries: u32, min_healthy_ms: u64, deadline_ms: u64) -> HealthCheck {
        HealthCheck {
            probe: Probe::Tcp {
                address: "x".into(),
            },
            interval_ms: 100,
            timeout_ms: 100,
            retries,
            min_healthy_ms,
            deadline_ms,
        }
    }

    #[test]
    fn passes_must_last_and_failures_in_a_row_end_it() {
        let c = spec(2, 300, 10_000);
        let mut v = Verdict::new();
        assert_eq!(v.next(&c, 0, true), Next::ProbeAgain);
        assert_eq!(v.next(&c, 200, true), Next::ProbeAgain);
        assert_eq!(v.next(&c, 300, true), Next::Healthy, "300 ms of passes");

        let mut v = Verdict::new();
        assert_eq!(v.next(&c, 0, true), Next::ProbeAgain);
        assert_eq!(
            v.next(&c, 100, false),
            Next::ProbeAgain,
            "a break resets the streak"
        );
        assert_eq!(v.next(&c, 200, true), Next::ProbeAgain);
        assert_eq!(v.next(&c, 400, true), Next::ProbeAgain);
        assert_eq!(v.next(&c, 500, true), Next::Healthy);

        let mut v = Verdict::new();
        assert_eq!(v.next(&c, 0, false), Next::ProbeAgain);
        assert_eq!(v.next(&c, 100, false), Next::ProbeAgain);
        assert_eq!(
            v.next(&c, 200, false),
            Next::Unhealthy,
            "three in a row > 2 retries"
        );
    }

    #[test]
    fn the_deadline_ends_a_check_that_never_settles() {
        let c = spec(100, 1_000, 500);
        let mut v = Verdict::new();
        assert_eq!(v.next(&c, 0, true), Next::ProbeAgain);
        assert_eq!(
            v.next(&c, 500, true),
            Next::Unhealthy,
            "not healthy long enough by the deadline"
        );
    }

    #[tokio::test]
    async fn http_probes_check_status_and_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            for body in ["ok ready", "starting"] {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.0 200 OK\r\n\r\n{body}").as_bytes())
                    .await;
            }
        });
        let url = format!("http://127.0.0.1:{port}/health");
        let t = Duration::from_secs(2);
        assert!(http_probe(&url, 200, Some("ready"), t).await.is_ok());
        let err = http_probe(&url, 200, Some("ready"), t)
            .await
            .expect_err("body")
            .to_string();
        assert!(err.contains("does not contain"), "{err}");
        let err = http_probe("http://127.0.0.1:1/x", 200, None, t)
            .await
            .expect_err("refused")
            .to_string();
        assert!(err.contains("127.0.0.1:1"), "{err}");
        assert!(http_probe("https://x/", 200, None, t).await.is_err());
    }
}
