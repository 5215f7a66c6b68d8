//! Who is asking on the HTTP side: dashboard login tokens, browser sessions, and the
//! CSRF rule every mutating request passes.
//!
//! Owns: sessions (a random id in an HttpOnly, SameSite=Strict cookie, in memory, 12 h,
//! at most 10,000); turning a request's credential into a [`User`] and its principal;
//! and the CSRF rule for mutating requests. Issuing and revoking login tokens is the
//! access service's (`services::access`). What each role may do is the authorization
//! table's (`gantry_protocol::authz`), never decided here. It must not serve routes
//! (that is `dashboard.rs`) nor know the storage engine.
//!
//! A request is authenticated by its session cookie or by `Authorization: Bearer
//! <login token>` (for scripts). Either way the login token is looked up in the store
//! on every request, so a revoked or expired token stops working at once, sessions
//! included.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use gantry_protocol::{Role, UnixMillis};

use crate::base::authz::Principal;
use crate::edges::http::request::Request;
use crate::services::access::LoginToken;
use crate::store::{LoginTokenRecord, Store};

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "gantry_session";
/// The header a browser must send on every mutating request. A page on another origin
/// cannot add a custom header to a cross-site request without a CORS preflight, which
/// this server never approves.
pub const CSRF_HEADER: &str = "x-gantry-csrf";
/// How long a browser session lasts (and never beyond its login token's expiry).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions held at once; beyond it the oldest is dropped (its browser logs in
/// again). 10,000 sessions take about 2 MB.
pub const MAX_SESSIONS: usize = 10_000;
/// Who made a request, and how it proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub token_id: String,
    pub name: String,
    pub role: Role,
    /// Authenticated by the session cookie (so CSRF rules apply), not a bearer header.
    pub by_cookie: bool,
}

impl User {
    /// The actor recorded in the audit log for what this user does.
    pub fn actor(&self) -> String {
        format!("web:{}:{}", self.name, self.token_id)
    }

    /// The user's principal in the authorization table.
    pub fn principal(&self) -> Principal {
        Principal::of_role(self.role)
    }
}

/// Why a request is not allowed; `status` is the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Internal(String),
}

impl Denied {
    pub fn status(&self) -> u16 {
        match self {
            Self::Unauthenticated(_) => 401,
            Self::Forbidden(_) => 403,
            Self::Internal(_) => 500,
        }
    }
}

/// Checks a presented login token against the store: known, secret matches, not
/// revoked, not expired.
pub fn verify_token(
    store: &Store,
    text: &str,
    now: UnixMillis,
) -> Result<LoginTokenRecord, Denied> {
    let token = LoginToken::parse(text).map_err(|e| Denied::Unauthenticated(e.to_string()))?;
    let record = store
        .login_token(&token.id)
        .map_err(|e| Denied::Internal(e.to_string()))?
        .filter(|r| gantry_certs::token::secret_matches(&token.secret, &r.secret_sha256))
        .ok_or_else(|| {
            Denied::Unauthenticated("unknown login token (never issued, or a wrong secret)".into())
        })?;
    check_record(&record, now)?;
    Ok(record)
}

fn check_record(record: &LoginTokenRecord, now: UnixMillis) -> Result<(), Denied> {
    if record.revoked_at.is_some() {
        return Err(Denied::Unauthenticated(format!(
            "login token {} was revoked; ask an admin for a new one",
            record.id
        )));
    }
    if now >= record.expires_at {
        return Err(Denied::Unauthenticated(format!(
            "login token {} expired at {}; ask an admin for a new one (`gantry admin token`)",
            record.id,
            record.expires_at.to_rfc3339()
        )));
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Session {
    token_id: String,
    expires_at: UnixMillis,
    created_at: UnixMillis,
}

/// Browser sessions: random 256-bit ids mapped to the login token they came from.
/// In memory, so a coordinator restart logs browsers out (they log in again with their
/// token); the token stays the credential.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Opens a session for a verified token; returns its id and how long it lasts.
    pub fn open(&self, token: &LoginTokenRecord, now: UnixMillis) -> (String, Duration) {
        let id = gantry_certs::hex(&gantry_certs::random_bytes::<32>());
        let expires_at = now.plus_secs(SESSION_TTL.as_secs()).min(token.expires_at);
        let mut live = self.lock();
        live.retain(|_, s| s.expires_at > now);
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live
                .iter()
                .min_by_key(|(_, s)| s.created_at)
                .map(|(k, _)| k.clone())
            {
                live.remove(&oldest);
            }
        }
        live.insert(
            id.clone(),
            Session {
                token_id: token.id.clone(),
                expires_at,
                created_at: now,
            },
        );
        (id, Duration::from_millis(expires_at.millis_since(now)))
    }

    pub fn close(&self, id: &str) {
        self.lock().remove(id);
    }

    fn token_of(&self, id: &str, now: UnixMillis) -> Option<String> {
        let mut live = self.lock();
        match live.get(id) {
            Some(s) if s.expires_at > now => Some(s.token_id.clone()),
            Some(_) => {
                live.remove(id);
                None
            }
            None => None,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .filter(|(k, _)| k == "cookie")
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Who made `req`: `None` when it carries no credential (no `Authorization` header, no
/// session cookie), else the user its credential names, or why the credential is refused.
pub fn identify(
    store: &Store,
    sessions: &Sessions,
    req: &Request,
    now: UnixMillis,
) -> Result<Option<User>, Denied> {
    if req.header("authorization").is_none() && cookie(req, SESSION_COOKIE).is_none() {
        return Ok(None);
    }
    authenticate(store, sessions, req, now).map(Some)
}

/// Who made `req`: a bearer login token, else the session cookie.
pub fn authenticate(
    store: &Store,
    sessions: &Sessions,
    req: &Request,
    now: UnixMillis,
) -> Result<User, Denied> {
    if let Some(value) = req.header("authorization") {
        let token = value.strip_prefix("Bearer ").ok_or_else(|| {
            Denied::Unauthenticated("Authorization must be `Bearer <login token>`".into())
        })?;
        let record = verify_token(store, token, now)?;
        return Ok(User {
            token_id: record.id,
            name: record.name,
            role: record.role,
            by_cookie: false,
        });
    }
    let unauthenticated =
        || Denied::Unauthenticated("log in with a token from `gantry admin token`".into());
    let session = cookie(req, SESSION_COOKIE).ok_or_else(unauthenticated)?;
    let token_id = sessions
        .token_of(session, now)
        .ok_or_else(unauthenticated)?;
    let record = store
        .login_token(&token_id)
        .map_err(|e| Denied::Internal(e.to_string()))?
        .ok_or_else(unauthenticated)?;
    if let Err(e) = check_record(&record, now) {
        sessions.close(session);
        return Err(e);
    }
    Ok(User {
        token_id: record.id,
        name: record.name,
        role: record.role,
        by_cookie: true,
    })
}

/// The CSRF rule for requests that change something, when a browser's cookie
/// authenticated them: the custom header must be present (a cross-site form or
/// `fetch` cannot send it without a preflight we never approve), and an `Origin`, when
/// the browser sends one, must name this server's host and port (its scheme is not
/// compared: a TLS-terminating proxy on loopback forwards `https://` origins to plain
/// HTTP). The cookie is also SameSite=Strict, so a cross-site request does not carry
/// it at all; any one of the checks would do.
pub fn check_csrf(req: &Request) -> Result<(), Denied> {
    if req.header(CSRF_HEADER).is_none_or(str::is_empty) {
        return Err(Denied::Forbidden(format!(
            "missing the {CSRF_HEADER} header: changes must come from the dashboard's own pages"
        )));
    }
    if let Some(origin) = req.header("origin") {
        let origin_host = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        if origin_host.is_none() || origin_host != req.header("host") {
            return Err(Denied::Forbidden(format!(
                "cross-origin request from {:?} refused",
                origin.chars().take(100).collect::<String>()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request {
        Request {
            method: "POST".into(),
            path: "/api/runs/1/retry".into(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            body: Vec::new(),
        }
    }

    #[test]
    fn csrf_needs_the_header_and_a_same_origin() {
        assert_eq!(check_csrf(&request(&[])).map_err(|e| e.status()), Err(403));
        let ok = request(&[("host", "coord:8443"), (CSRF_HEADER, "1")]);
        assert!(check_csrf(&ok).is_ok());
        let same = request(&[
            ("host", "coord:8443"),
            (CSRF_HEADER, "1"),
            ("origin", "https://coord:8443"),
        ]);
        assert!(check_csrf(&same).is_ok());
        let cross = request(&[
            ("host", "coord:8443"),
            (CSRF_HEADER, "1"),
            ("origin", "https://evil.example"),
        ]);
        assert_eq!(check_csrf(&cross).map_err(|e| e.status()), Err(403));
        let null = request(&[
            ("host", "coord:8443"),
            (CSRF_HEADER, "1"),
            ("origin", "null"),
        ]);
        assert_eq!(check_csrf(&null).map_err(|e| e.status()), Err(403));
        let proxied = request(&[
            ("host", "coord:8443"),
            (CSRF_HEADER, "1"),
            ("origin", "http://coord:8443"),
        ]);
        assert!(check_csrf(&proxied).is_ok(), "the scheme is not compared");
    }

    #[test]
    fn cookies_are_found_among_others_and_sessions_expire() {
        let req = request(&[("cookie", "a=1; gantry_session=abc; b=2")]);
        assert_eq!(cookie(&req, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&request(&[]), SESSION_COOKIE), None);
        let sessions = Sessions::default();
        let record = LoginTokenRecord {
            id: "lt-1".into(),
            name: "n".into(),
            role: Role::Viewer,
            secret_sha256: Vec::new(),
            created_at: UnixMillis(0),
            created_by: String::new(),
            expires_at: UnixMillis(60_000),
            revoked_at: None,
        };
        let (id, lasts) = sessions.open(&record, UnixMillis(0));
        assert_eq!(
            lasts,
            Duration::from_secs(60),
            "capped by the token's expiry"
        );
        assert_eq!(
            sessions.token_of(&id, UnixMillis(59_999)),
            Some("lt-1".into())
        );
        assert_eq!(sessions.token_of(&id, UnixMillis(60_000)), None);
        assert_eq!(sessions.len(), 0, "an expired session is dropped when met");
    }
}
