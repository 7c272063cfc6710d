//! Headless Chromium (Debian's `chromium`) driven through the Chrome DevTools Protocol, for
//! the remote access page's tests.
//!
//! A minimal CDP client rather than the `chromiumoxide` crate: chromiumoxide 0.7 carries the
//! whole generated protocol (`chromiumoxide_cdp`: ~100,000 lines, 5 MB of source) and its own
//! websocket stack, which costs minutes of compile time on a 2-core machine for the five
//! commands these tests need. This speaks JSON over one websocket (`tokio-tungstenite`):
//! `Target.createTarget`, `Target.attachToTarget` (flattened sessions), `Page.navigate`,
//! `Runtime.evaluate` (`awaitPromise`, `returnByValue`) and `Input.dispatchKeyEvent`.
//!
//! The browser runs with a fresh profile in a temporary directory, on loopback only
//! (`--remote-debugging-port=0`: the port it picked is read from the `DevTools listening on
//! ws://…` line on its stderr), and is killed when the [`Browser`] is dropped.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::peers::tools::require;

/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines of the browser's stderr kept for error messages.
const STDERR_TAIL: usize = 40;

/// A headless Chromium with one page attached.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The flattened session of the page every command goes to.
    session: String,
    next_id: u64,
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts `chromium` and opens a blank page. Fails (never skips) when it is missing.
    pub fn start() -> anyhow::Result<Self> {
        let chromium = require("chromium", "chromium")?;
        let profile = tempfile::tempdir()?;
        let mut cmd = Command::new(&chromium);
        cmd.arg("--headless=new")
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args([
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-gpu",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--password-store=basic",
                "--use-mock-keychain",
            ]);
        // Chromium's sandbox refuses to run as root (test containers); as a normal user it stays on.
        if nix::unistd::Uid::effective().is_root() {
            cmd.arg("--no-sandbox");
        }
        cmd.arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", chromium.display()))?;
        let stderr = child.stderr.take().context("chromium's stderr")?;
        let tail = Arc::new(Mutex::new(Vec::new()));
        let (url_tx, url_rx) = mpsc::channel();
        let keep = tail.clone();
        // Reads stderr to its end (a full pipe would stall the browser), keeping a tail.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = url_tx.send(url.trim().to_owned());
                }
                if let Ok(mut tail) = keep.lock() {
                    if tail.len() == STDERR_TAIL {
                        tail.remove(0);
                    }
                    tail.push(line);
                }
            }
        });
        let url = match url_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let lines = tail.lock().map(|t| t.join("\n")).unwrap_or_default();
                bail!("chromium printed no `DevTools listening on` line; its stderr:\n{lines}");
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let connected = rt.block_on(async {
            tokio::time::timeout(COMMAND_TIMEOUT, tokio_tungstenite::connect_async(&url)).await
        });
        let ws = match connected {
            Ok(Ok((ws, _))) => ws,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("connecting to chromium's DevTools at {url}: {other:?}");
            }
        };
        let mut browser = Self {
            rt,
            ws,
            session: String::new(),
            next_id: 0,
            child,
            stderr: tail,
            _profile: profile,
        };
        let target = browser.call(
            "Target.createTarget",
            json!({ "url": "about:blank" }),
            false,
        )?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
            false,
        )?;
        browser.session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_owned();
        Ok(browser)
    }

    /// Sends one command (to the page's session when `to_page`) and returns its result;
    /// events and other answers on the way are skipped.
    fn call(&mut self, method: &str, params: Value, to_page: bool) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if to_page {
            message["sessionId"] = json!(self.session);
        }
        let ws = &mut self.ws;
        let answer = self.rt.block_on(async {
            tokio::time::timeout(COMMAND_TIMEOUT, async {
                ws.send(Message::text(message.to_string())).await?;
                while let Some(frame) = ws.next().await {
                    let frame = frame?;
                    let Ok(text) = frame.to_text() else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(text) else {
                        continue;
                    };
                    if v["id"] == json!(id) {
                        return Ok(v);
                    }
                }
                anyhow::bail!("the DevTools connection closed")
            })
            .await
        });
        let answer = match answer {
            Ok(answer) => answer.with_context(|| format!("DevTools {method}"))?,
            Err(_) => bail!(
                "DevTools {method} took over {COMMAND_TIMEOUT:?}; chromium's stderr:\n{}",
                self.stderr_tail()
            ),
        };
        if let Some(error) = answer.get("error") {
            bail!("DevTools {method} failed: {error}");
        }
        Ok(answer["result"].clone())
    }

    /// The last lines chromium wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.stderr.lock().map(|t| t.join("\n")).unwrap_or_default()
    }

    /// Loads `url` in the page (a real navigation: a fresh document, scripts run again).
    pub fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        let result = self.call("Page.navigate", json!({ "url": url }), true)?;
        if let Some(error) = result["errorText"].as_str() {
            bail!("navigating to {url}: {error}");
        }
        Ok(())
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value as JSON
    /// (`Null` for `undefined`). A thrown exception is an error.
    pub fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            true,
        )?;
        if let Some(details) = result.get("exceptionDetails") {
            bail!("`{expression}` threw: {details}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Evaluates `expression` until it is truthy (not null, false, 0 or ""), for up to
    /// `timeout`; returns that value. On timeout the error shows `describe`'s value.
    pub fn wait_until(
        &mut self,
        what: &str,
        expression: &str,
        describe: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let got = super::wait_for(what, timeout, || {
            let v = self.eval(expression).ok()?;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            truthy.then_some(v)
        });
        match got {
            Ok(v) => Ok(v),
            Err(e) => {
                let seen = self.eval(describe).unwrap_or_else(|e| json!(e.to_string()));
                bail!("{e}; the page shows: {seen}")
            }
        }
    }

    /// Presses and releases Enter in the page (on whatever element has the focus).
    pub fn press_enter(&mut self) -> anyhow::Result<()> {
        for kind in ["keyDown", "keyUp"] {
            let mut params = json!({
                "type": kind, "key": "Enter", "code": "Enter",
                "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13,
            });
            if kind == "keyDown" {
                params["text"] = json!("\r");
            }
            self.call("Input.dispatchKeyEvent", params, true)?;
        }
        Ok(())
    }

    /// Presses Tab `times` times (moving the keyboard focus).
    pub fn press_tab(&mut self, times: usize) -> anyhow::Result<()> {
        for _ in 0..times {
            for kind in ["keyDown", "keyUp"] {
                let params = json!({
                    "type": kind, "key": "Tab", "code": "Tab",
                    "windowsVirtualKeyCode": 9, "nativeVirtualKeyCode": 9,
                });
                self.call("Input.dispatchKeyEvent", params, true)?;
            }
        }
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
