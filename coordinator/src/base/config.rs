//! Coordinator configuration (`coordinator.toml` with its `[artifacts]` and `[webhooks]`
//! sections) and on-disk layout, and the parsers of durations and sizes it shares with
//! the CLI. Loading it is the server's start-up, an edge: errors are `anyhow` with the
//! key they are about.
//!
//! Data directory (default `/var/lib/gantry`, `--data-dir` or `GANTRY_DATA_DIR`):
//! `coordinator.toml`, `gantry.redb`, `tls/ca.pem`, `tls/ca-key.pem` (0600),
//! `tls/coordinator.pem` (certificate and key, 0600).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use gantry_protocol::limits;
use serde::{Deserialize, Serialize};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/gantry";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";

/// `coordinator.toml`, written by `gantry init` and read by `gantry server`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// UDP address the QUIC endpoint binds.
    pub listen: String,
    /// `host:port` agents are told to dial (carried in join tokens).
    pub advertise: String,
    /// Lifetime of agent certificates, e.g. `7d`. Agents renew at two thirds of it.
    #[serde(default = "default_agent_cert_ttl")]
    pub agent_cert_ttl: String,
    /// How often agents report, e.g. `5s`.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: String,
    /// Address of the HTTP side (push webhook, health check), e.g. `127.0.0.1:7080`.
    /// Plain HTTP, so loopback addresses only. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
    /// Serve the HTTP side over TLS with the coordinator certificate. Default: on for
    /// any address but loopback, where plain HTTP is allowed; off is refused elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_tls: Option<bool>,
    /// The agent binary served on `/agent/gantry-agent` and put into offline bundles.
    /// Default: `../lib/gantry/gantry-agent` from the `gantry` executable (the .deb),
    /// else `gantry-agent` beside it (a build or tarball).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_binary: Option<String>,
    /// Retention of artifacts, caches and chunks. Left out of the file while it holds
    /// the defaults.
    #[serde(default, skip_serializing_if = "ArtifactsConfig::is_default")]
    pub artifacts: ArtifactsConfig,
    /// Outgoing webhook delivery. Left out of the file while it holds the defaults.
    #[serde(default, skip_serializing_if = "WebhooksConfig::is_default")]
    pub webhooks: WebhooksConfig,
    /// The dashboard's address as people reach it (`https://ci.example.com`, behind a
    /// proxy or not): commit statuses on the forge link to `PUBLIC_URL/runs/N`. No links
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

/// `[artifacts]` in `coordinator.toml`. Every field has a default, so the section may be
/// left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArtifactsConfig {
    /// Branches whose jobs restore only caches written on the same branch (other
    /// branches fall back to these branches' caches).
    pub protected_branches: Vec<String>,
    /// Caches are evicted, least recently used first, beyond this total, e.g. `10GiB`.
    pub cache_quota: String,
    /// Caches not restored for this long are evicted, e.g. `7d`.
    pub cache_max_idle: String,
    /// How often garbage collection runs, e.g. `1h`.
    pub gc_interval: String,
    /// Unreferenced chunks younger than this are kept (an upload whose coordinator
    /// restarted comes back for them), e.g. `1h`.
    pub gc_grace: String,
    /// A cap on what the coordinator sends in artifact, cache and release chunks, per
    /// second across every reader (e.g. `50MiB`), so transfers leave room on its link
    /// for the rest; no cap unless set. Deployments' hosts fetch from each other, so
    /// a cap here slows staging far less than the number of hosts suggests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_send_rate: Option<String>,
}

impl Default for ArtifactsConfig {
    fn default() -> Self {
        Self {
            protected_branches: vec!["main".into()],
            cache_quota: "10GiB".into(),
            cache_max_idle: "7d".into(),
            gc_interval: "1h".into(),
            gc_grace: "1h".into(),
            max_send_rate: None,
        }
    }
}

/// [`ArtifactsConfig`], parsed.
#[derive(Debug, Clone)]
pub struct ArtifactSettings {
    pub protected_branches: Vec<String>,
    pub cache_quota_bytes: u64,
    pub cache_max_idle: Duration,
    pub gc_interval: Duration,
    pub gc_grace: Duration,
    /// Bytes per second.
    pub max_send_rate: Option<u64>,
}

impl ArtifactsConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn settings(&self) -> anyhow::Result<ArtifactSettings> {
        let gc_interval = parse_duration(&self.gc_interval).context("artifacts.gc_interval")?;
        if gc_interval < Duration::from_secs(1) {
            bail!("artifacts.gc_interval must be at least 1s");
        }
        Ok(ArtifactSettings {
            protected_branches: self.protected_branches.clone(),
            cache_quota_bytes: parse_bytes(&self.cache_quota).context("artifacts.cache_quota")?,
            cache_max_idle: parse_duration(&self.cache_max_idle)
                .context("artifacts.cache_max_idle")?,
            gc_interval,
            gc_grace: parse_duration(&self.gc_grace).context("artifacts.gc_grace")?,
            max_send_rate: match &self.max_send_rate {
                None => None,
                Some(text) => match parse_bytes(text).context("artifacts.max_send_rate")? {
                    0 => bail!(
                        "artifacts.max_send_rate must be more than 0 (leave it out for no cap)"
                    ),
                    rate => Some(rate),
                },
            },
        })
    }
}

/// `[webhooks]` in `coordinator.toml`, parsed.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// The first retry waits between half of this and this; each next one three times
    /// longer, capped at 18 times it.
    pub retry_base: Duration,
    /// Attempts per delivery, the first included.
    pub attempts: u32,
    /// Deadline of one attempt (connect, TLS, send, the answer's status line).
    pub timeout: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            retry_base: Duration::from_secs(10),
            attempts: 5,
            timeout: Duration::from_secs(10),
        }
    }
}

/// `[webhooks]` in `coordinator.toml`: how outgoing webhooks are retried. Every field
/// has a default, so the section may be left out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// The first retry waits between half of this and this; each next one three times
    /// longer (at most 18 times it), e.g. `10s`.
    pub retry_base: String,
    /// Attempts per delivery, the first included (1 to 10).
    pub attempts: u32,
    /// Deadline of one attempt, e.g. `10s`.
    pub timeout: String,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            retry_base: "10s".into(),
            attempts: 5,
            timeout: "10s".into(),
        }
    }
}

impl WebhooksConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn settings(&self) -> anyhow::Result<WebhookSettings> {
        let retry_base = parse_duration(&self.retry_base).context("webhooks.retry_base")?;
        let timeout = parse_duration(&self.timeout).context("webhooks.timeout")?;
        if !(Duration::from_millis(10)..=Duration::from_secs(3600)).contains(&retry_base) {
            anyhow::bail!("webhooks.retry_base must be between 10ms and 1h");
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&timeout) {
            anyhow::bail!("webhooks.timeout must be between 100ms and 60s");
        }
        if !(1..=10).contains(&self.attempts) {
            anyhow::bail!("webhooks.attempts must be between 1 and 10");
        }
        Ok(WebhookSettings {
            retry_base,
            attempts: self.attempts,
            timeout,
        })
    }
}

/// Parses a byte size: a number with an optional unit B, KiB, MiB, GiB, TiB (or KB, MB,
/// GB, TB in powers of 1000), like `10GiB`.
pub fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().with_context(|| {
        format!("invalid size {text:?}: expected a number then a unit, like 10GiB or 500MB")
    })?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => bail!("invalid size {text:?}: unit must be B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"),
    };
    n.checked_mul(scale)
        .with_context(|| format!("size {text:?} is too large"))
}

fn default_agent_cert_ttl() -> String {
    "7d".into()
}

fn default_heartbeat() -> String {
    format!("{}s", limits::DEFAULT_HEARTBEAT_INTERVAL.as_secs())
}

impl CoordinatorConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read {}; run `gantry init --data-dir DIR` first, or pass --config",
                path.display()
            )
        })?;
        let config: Self = toml::from_str(&text)
            .with_context(|| format!("invalid coordinator config {}", path.display()))?;
        config
            .agent_cert_ttl()
            .with_context(|| format!("{}: agent_cert_ttl", path.display()))?;
        config
            .heartbeat_interval()
            .with_context(|| format!("{}: heartbeat_interval", path.display()))?;
        config
            .artifacts
            .settings()
            .with_context(|| format!("{}: [artifacts]", path.display()))?;
        config
            .webhooks
            .settings()
            .with_context(|| format!("{}: [webhooks]", path.display()))?;
        Ok(config)
    }

    /// `public_url` without its trailing `/`, checked: an http(s) URL of at most 200
    /// characters with no query, fragment, spaces or control characters (it is put
    /// into links on forges, so it must be one).
    pub fn public_url(&self) -> anyhow::Result<Option<String>> {
        let Some(url) = &self.public_url else {
            return Ok(None);
        };
        let trimmed = url.trim_end_matches('/');
        let rest = trimmed
            .strip_prefix("https://")
            .or_else(|| trimmed.strip_prefix("http://"));
        let host_ok = rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'));
        if !host_ok
            || trimmed.len() > 200
            || trimmed
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "?#\"<>".contains(c))
        {
            bail!(
                "public_url {url:?} is not a URL links can point to: give the dashboard's address as people reach it, like \"https://ci.example.com\" (http or https, at most 200 characters, no query or fragment)"
            );
        }
        Ok(Some(trimmed.to_owned()))
    }

    pub fn agent_cert_ttl(&self) -> anyhow::Result<Duration> {
        let d = parse_duration(&self.agent_cert_ttl)?;
        if d < Duration::from_secs(3) {
            bail!(
                "agent certificate lifetime {:?} is too short: use at least 3s",
                self.agent_cert_ttl
            );
        }
        Ok(d)
    }

    pub fn heartbeat_interval(&self) -> anyhow::Result<Duration> {
        let d = parse_duration(&self.heartbeat_interval)?;
        if d < Duration::from_millis(100) || d >= limits::IDLE_TIMEOUT {
            bail!(
                "heartbeat interval {:?} must be between 100ms and {}s",
                self.heartbeat_interval,
                limits::IDLE_TIMEOUT.as_secs()
            );
        }
        Ok(d)
    }
}

/// Paths inside a coordinator data directory.
#[derive(Debug, Clone)]
pub struct DataDir(pub PathBuf);

impl DataDir {
    pub fn config(&self) -> PathBuf {
        self.0.join("coordinator.toml")
    }
    pub fn store(&self) -> PathBuf {
        self.0.join("gantry.redb")
    }
    pub fn tls(&self) -> PathBuf {
        self.0.join("tls")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.tls().join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.tls().join("ca-key.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.tls().join("coordinator.pem")
    }
}

/// The admin CLI's context file.
/// Parses `500ms`, `30s`, `15m`, `2h`, `7d` (one number and one unit).
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().with_context(|| {
        format!("invalid duration {text:?}: expected a number then ms, s, m, h or d, like 15m")
    })?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => bail!("invalid duration {text:?}: unit must be ms, s, m, h or d, like 15m"),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_url_is_an_http_address_without_its_trailing_slash() {
        let with = |url: &str| CoordinatorConfig {
            public_url: Some(url.to_owned()),
            ..toml::from_str("listen = \"127.0.0.1:7443\"\nadvertise = \"h:7443\"\n")
                .expect("config")
        };
        assert_eq!(
            with("https://ci.example.com/").public_url().expect("ok"),
            Some("https://ci.example.com".to_owned())
        );
        assert_eq!(
            with("http://10.0.0.5:7080/gantry")
                .public_url()
                .expect("ok"),
            Some("http://10.0.0.5:7080/gantry".to_owned())
        );
        for bad in [
            "ci.example.com",
            "javascript:alert(1)",
            "https://",
            "https:///runs",
            "https://ci.example.com/?a=1",
            "https://ci example.com",
        ] {
            let e = with(bad).public_url().expect_err(bad).to_string();
            assert!(
                e.contains("public_url") && e.contains("https://ci.example.com"),
                "{e}"
            );
        }
    }

    #[test]
    fn durations_parse_and_bad_ones_say_how_to_fix() {
        assert_eq!(
            parse_duration("15m").expect("15m"),
            Duration::from_secs(900)
        );
        assert_eq!(
            parse_duration("250ms").expect("ms"),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("7d").expect("7d"),
            Duration::from_secs(7 * 86_400)
        );
        for bad in ["", "m", "15", "15x", "-1s", "1.5h"] {
            let err = parse_duration(bad).expect_err(bad).to_string();
            assert!(err.contains("like 15m"), "{bad}: {err}");
        }
    }

    #[test]
    fn sizes_parse_and_bad_ones_say_how_to_fix() {
        assert_eq!(parse_bytes("10GiB").expect("GiB"), 10 << 30);
        assert_eq!(parse_bytes("500MB").expect("MB"), 500_000_000);
        assert_eq!(parse_bytes("4096").expect("bytes"), 4096);
        for bad in ["", "GiB", "10 gigs", "1.5GiB", "99999999999TiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        let defaults = ArtifactsConfig::default().settings().expect("defaults");
        assert_eq!(defaults.protected_branches, ["main"]);
        assert_eq!(defaults.cache_quota_bytes, 10 << 30);
    }

    #[test]
    fn the_config_section_has_defaults_and_bounds() {
        let defaults = WebhooksConfig::default().settings().expect("defaults");
        assert_eq!(
            (defaults.retry_base, defaults.attempts, defaults.timeout),
            (Duration::from_secs(10), 5, Duration::from_secs(10))
        );
        let parsed: WebhooksConfig =
            toml::from_str("retry_base = \"200ms\"\nattempts = 3\n").expect("toml");
        assert_eq!(
            parsed.settings().expect("ok").retry_base,
            Duration::from_millis(200)
        );
        for bad in [
            "attempts = 0",
            "attempts = 11",
            "timeout = \"50ms\"",
            "retry_base = \"2h\"",
            "retry_base = \"soon\"",
        ] {
            let config: WebhooksConfig = toml::from_str(bad).expect("toml");
            assert!(config.settings().is_err(), "{bad}");
        }
        assert!(
            toml::from_str::<WebhooksConfig>("retries = 3").is_err(),
            "unknown keys are refused"
        );
    }
}
