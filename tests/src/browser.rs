//! A headless Chromium driven over the Chrome DevTools Protocol, for the dashboard
//! tests: no WebDriver, no websocket, no extra crate.
//!
//! Chromium is started with `--remote-debugging-pipe`, which speaks CDP as JSON
//! messages ended by a NUL byte on file descriptors 3 (commands in) and 4 (answers and
//! events out). `sh` wires our pipes to those descriptors before it `exec`s Chromium,
//! so no unsafe `pre_exec` is needed. Every call has a deadline; the browser and every
//! process it started (its own process group) are killed when the [`Browser`] drops,
//! also when a test panics.
//!
//! Tests that need a browser call [`Browser::launch_or_skip`]: without Chromium they
//! skip, saying what to install (they fail instead under `GANTRY_REQUIRE_ALL_TESTS=1`,
//! as in CI); `GANTRY_SKIP_BROWSER_TESTS=1` skips them either way.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Deadline of one CDP call that is not told otherwise.
pub const CALL_DEADLINE: Duration = Duration::from_secs(20);
/// Events kept while waiting for answers; older ones are dropped.
const MAX_EVENTS: usize = 1000;

/// The browser executable: `GANTRY_CHROMIUM`, else the first of `chromium`,
/// `chromium-browser`, `google-chrome` on `PATH`.
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("GANTRY_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

/// Where the dashboard tests save screenshots: `GANTRY_SCREENSHOT_DIR`, else
/// `dashboard-screenshots` in the cargo target directory.
pub fn screenshot_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GANTRY_SCREENSHOT_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> → target
    exe.ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        .join("dashboard-screenshots")
}

struct Conn {
    stdin: ChildStdin,
    incoming: mpsc::Receiver<Value>,
    events: VecDeque<Value>,
    next_id: u64,
}

impl Conn {
    fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: &Value,
        deadline: Duration,
    ) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.stdin
            .write_all(&bytes)
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("{method}: cannot write to the browser: {e}"))?;
        let until = Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let msg = self.incoming.recv_timeout(left).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => {
                    format!("{method}: no answer within {deadline:?}")
                }
                mpsc::RecvTimeoutError::Disconnected => format!("{method}: the browser went away"),
            })?;
            if msg["id"].as_u64() == Some(id) {
                if let Some(err) = msg.get("error") {
                    return Err(format!("{method}: {err}"));
                }
                return Ok(msg["result"].clone());
            }
            if msg.get("method").is_some() {
                self.events.push_back(msg);
                while self.events.len() > MAX_EVENTS {
                    self.events.pop_front();
                }
            }
        }
    }
}

/// A running headless Chromium.
pub struct Browser {
    conn: Arc<Mutex<Conn>>,
    child: Child,
    _profile: tempfile::TempDir,
    log: PathBuf,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Browser(pid {})", self.child.id())
    }
}

impl Browser {
    /// Starts the browser, or returns `None` (after saying so) when
    /// `GANTRY_SKIP_BROWSER_TESTS=1`. Without a browser, returns `None` after one line
    /// saying what to install, or panics under `GANTRY_REQUIRE_ALL_TESTS=1`
    /// ([`crate::requires`]).
    pub fn launch_or_skip(test: &str) -> Option<Self> {
        if std::env::var("GANTRY_SKIP_BROWSER_TESTS").as_deref() == Ok("1") {
            eprintln!("skipping {test}: GANTRY_SKIP_BROWSER_TESTS=1");
            return None;
        }
        let Some(exe) = find_chromium() else {
            crate::requires::missing(
                test,
                "Chromium",
                "apt-get install chromium, or set GANTRY_CHROMIUM=/path/to/chrome",
                None,
            );
            return None;
        };
        Some(
            Self::launch(&exe)
                .unwrap_or_else(|e| panic!("{test}: cannot start {}: {e}", exe.display())),
        )
    }

    pub fn launch(exe: &Path) -> Result<Self, String> {
        use std::os::unix::process::CommandExt as _;
        let profile = tempfile::Builder::new()
            .prefix("gantry-chromium-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let log = profile.path().join("chromium.log");
        // `--no-sandbox`: the tests run as root in CI, where Chromium's sandbox refuses
        // to start; the browser only ever loads our own pages on loopback.
        let flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-features=Translate,MediaRouter,OptimizationHints",
            "--hide-scrollbars",
            "--mute-audio",
            "--remote-debugging-pipe",
        ];
        let script = format!(
            "exec \"$0\" {} --user-data-dir=\"$1\" about:blank 3<&0 4>&1 </dev/null >/dev/null 2>>\"$2\"",
            flags.join(" ")
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(exe)
            .arg(profile.path())
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot spawn sh: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin pipe")?;
        let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut piece = vec![0u8; 64 * 1024];
            loop {
                let n = match stdout.read(&mut piece) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&piece[..n]);
                while let Some(end) = buf.iter().position(|b| *b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&msg[..msg.len() - 1]) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let browser = Self {
            conn: Arc::new(Mutex::new(Conn {
                stdin,
                incoming: rx,
                events: VecDeque::new(),
                next_id: 0,
            })),
            child,
            _profile: profile,
            log,
        };
        let version = browser
            .call(None, "Browser.getVersion", &json!({}))
            .map_err(|e| format!("{e}; its log: {}", browser.log()))?;
        eprintln!("browser: {}", version["product"].as_str().unwrap_or("?"));
        Ok(browser)
    }

    fn call(&self, session: Option<&str>, method: &str, params: &Value) -> Result<Value, String> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .call(session, method, params, CALL_DEADLINE)
    }

    /// What the browser wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A new tab in a fresh browser context (its own cookies), `width` × `height`.
    pub fn tab(&self, width: u32, height: u32) -> Tab {
        let context = self
            .call(
                None,
                "Target.createBrowserContext",
                &json!({ "disposeOnDetach": true }),
            )
            .expect("browser context")["browserContextId"]
            .clone();
        let target = self
            .call(
                None,
                "Target.createTarget",
                &json!({ "url": "about:blank", "browserContextId": context }),
            )
            .expect("target")["targetId"]
            .as_str()
            .expect("target id")
            .to_owned();
        let session = self
            .call(
                None,
                "Target.attachToTarget",
                &json!({ "targetId": target, "flatten": true }),
            )
            .expect("attach")["sessionId"]
            .as_str()
            .expect("session id")
            .to_owned();
        let tab = Tab {
            conn: self.conn.clone(),
            session,
        };
        tab.call("Page.enable", &json!({}));
        tab.call("Runtime.enable", &json!({}));
        tab.call(
            "Emulation.setDeviceMetricsOverride",
            &json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        tab
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self
            .conn
            .lock()
            .map(|mut c| c.call(None, "Browser.close", &json!({}), Duration::from_secs(3)));
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Renderers and helpers are in the browser's process group: end them all.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            crate::signal_group(pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One page of the browser.
pub struct Tab {
    conn: Arc<Mutex<Conn>>,
    session: String,
}

impl std::fmt::Debug for Tab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tab({})", self.session)
    }
}

impl Tab {
    fn call(&self, method: &str, params: &Value) -> Value {
        self.try_call(method, params, CALL_DEADLINE)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_call(&self, method: &str, params: &Value, deadline: Duration) -> Result<Value, String> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .call(Some(&self.session), method, params, deadline)
    }

    /// Loads `url` (waiting only for the navigation to be committed).
    pub fn navigate(&self, url: &str) {
        let result = self.call("Page.navigate", &json!({ "url": url }));
        assert!(
            result.get("errorText").is_none(),
            "navigating to {url}: {result}"
        );
    }

    /// Evaluates `expression` in the page (awaiting it if it is a promise) and returns
    /// its value; panics with the page's exception if it throws.
    pub fn eval(&self, expression: &str) -> Value {
        self.eval_within(expression, CALL_DEADLINE)
    }

    /// [`Self::eval`] with a deadline of its own.
    pub fn eval_within(&self, expression: &str, deadline: Duration) -> Value {
        let result = self
            .try_call(
                "Runtime.evaluate",
                &json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
                deadline + Duration::from_secs(2),
            )
            .unwrap_or_else(|e| panic!("evaluating {expression:?}: {e}"));
        if let Some(ex) = result.get("exceptionDetails") {
            panic!(
                "evaluating {expression:?} threw: {}",
                ex["exception"]["description"]
                    .as_str()
                    .unwrap_or(&ex.to_string())
            );
        }
        result["result"]["value"].clone()
    }

    /// Waits, in the page, until the JavaScript `condition` is true (checked at every DOM
    /// change and every 25 ms); panics with `what` after `deadline`.
    pub fn wait_until(&self, what: &str, condition: &str, deadline: Duration) {
        let ms = deadline.as_millis();
        let script = format!(
            r"new Promise((resolve) => {{
                const test = () => {{ try {{ return !!({condition}); }} catch (_) {{ return false; }} }};
                if (test()) return resolve(true);
                const timer = setInterval(() => {{ if (test()) done(true); }}, 25);
                const obs = new MutationObserver(() => {{ if (test()) done(true); }});
                obs.observe(document, {{ childList: true, subtree: true, characterData: true, attributes: true }});
                const stop = setTimeout(() => done(false), {ms});
                function done(v) {{ clearInterval(timer); clearTimeout(stop); obs.disconnect(); resolve(v); }}
            }})"
        );
        let ok = self.eval_within(&script, deadline);
        assert_eq!(
            ok,
            Value::Bool(true),
            "timed out after {deadline:?} waiting for {what} (`{condition}`); the page shows: {}",
            self.eval("document.body ? document.body.innerText.slice(0, 2000) : ''")
        );
    }

    /// Saves a PNG of the viewport to `path`.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let shot = self.call("Page.captureScreenshot", &json!({ "format": "png" }));
        let data = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        assert!(data.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, data).expect("write screenshot");
    }
}
