//! A headless Chromium driven over the Chrome DevTools Protocol: a small client over one
//! WebSocket (tokio-tungstenite), enough to open a page, evaluate JavaScript in it, wait for
//! a condition on its DOM and take a screenshot.
//!
//! Debian's `chromium` is required (`ci/setup` installs it); without it the test fails with a
//! message saying so, never skips.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The chromium binary: `$CHROMIUM`, else `/usr/bin/chromium`.
fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// A running headless Chromium with one page attached.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    socket: Socket,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium with a fresh profile and opens a blank page.
    pub async fn launch() -> Browser {
        let bin = chromium();
        assert!(
            bin.exists(),
            "chromium not found at {} (set CHROMIUM to another path): the dashboard's browser \
             test needs it; install it with ci/setup (Debian: apt-get install chromium)",
            bin.display()
        );
        let profile = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--window-size=1400,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = child
            .stderr
            .take()
            .unwrap_or_else(|| panic!("no stderr from chromium"));
        // Chromium prints the browser's DevTools address on stderr.
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(i) = line.find("ws://") {
                    return Some(line[i..].trim().to_owned());
                }
                seen.push(line);
            }
            None
        })
        .await;
        let url = match url {
            Ok(Some(u)) => u,
            other => panic!(
                "chromium did not print its DevTools address ({other:?}); it said:\n{}",
                seen.join("\n")
            ),
        };
        // Keep draining stderr so that chromium never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to chromium at {url}: {e}"));
        let mut b = Browser {
            child,
            socket,
            session: String::new(),
            next_id: 0,
            _profile: profile,
        };
        let target = b
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let target_id = target["targetId"].as_str().unwrap_or_default().to_owned();
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await;
        b.session = attached["sessionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        b
    }

    /// Sends one command (to the page once attached) and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::text(msg.to_string()))
            .await
            .unwrap_or_else(|e| panic!("{method}: cannot send to chromium: {e}"));
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(m) = self.socket.next().await {
                let text = match m {
                    Ok(Message::Text(t)) => t,
                    Ok(_) => continue,
                    Err(e) => panic!("{method}: chromium's socket failed: {e}"),
                };
                let v: Value = serde_json::from_str(&text).unwrap_or_default();
                if v["id"] == json!(id) {
                    return v;
                }
            }
            panic!("{method}: chromium closed its socket")
        })
        .await
        .unwrap_or_else(|_| panic!("{method}: no answer from chromium in 30 s"));
        if let Some(e) = answer.get("error") {
            panic!("{method}: chromium refused: {e}");
        }
        answer["result"].clone()
    }

    /// Opens `url` in the page.
    pub async fn goto(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({ "url": url })).await;
        assert!(r.get("errorText").is_none(), "cannot open {url}: {r}");
    }

    /// Evaluates `expr` in the page and returns its value (as JSON).
    pub async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true }),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            return json!({ "exception": e["exception"]["description"].clone() });
        }
        r["result"]["value"].clone()
    }

    /// Polls `cond` (a JavaScript expression) until it is `true`; panics after `timeout`
    /// with `why`, the last value of `show` (an expression describing the state) and the
    /// page's text.
    pub async fn wait_for(&mut self, why: &str, cond: &str, show: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.eval(cond).await == json!(true) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let shown = self.eval(show).await;
                let text = self
                    .eval("document.body ? document.body.innerText.slice(0, 3000) : ''")
                    .await;
                panic!(
                    "timed out after {timeout:?} waiting until {why}\n  condition: {cond}\n  state: {shown}\n--- page text\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG screenshot of the page to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("screenshot: not base64: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "screenshot: not a PNG");
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium's helper processes share its process group: end them all.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = self.child.start_kill();
    }
}
