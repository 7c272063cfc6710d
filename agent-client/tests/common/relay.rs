//! An in-process relay on loopback with its own runtime, driven through its real HTTP API.

use std::time::Duration;

use anyhow::{bail, Context as _};
use porthole_relay::{start, RelayConfig, RelayHandle};
use serde_json::{json, Value};
use tokio::runtime::Runtime;

/// A running relay and an API client for it.
pub struct TestRelay {
    /// The runtime the relay runs on (kept alive with it).
    pub rt: Runtime,
    /// The relay.
    pub handle: RelayHandle,
    /// Its data dir.
    pub dir: tempfile::TempDir,
    /// API base URL.
    pub api: String,
    /// Blocking HTTP client.
    pub http: reqwest::blocking::Client,
}

/// A created session, as the API answered.
#[derive(Debug, Clone)]
pub struct Created {
    /// Session id.
    pub id: String,
    /// Join token.
    pub token: String,
    /// Public ports by service, in request order.
    pub ports: Vec<(String, u16)>,
}

impl Created {
    /// The public port of `service`.
    pub fn port(&self, service: &str) -> u16 {
        self.ports
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, p)| *p)
            .unwrap_or(0)
    }
}

fn random_range() -> porthole_relay::config::PortRange {
    let base = 24000 + (rand::random::<u16>() % 300) * 20;
    porthole_relay::config::PortRange {
        lo: base,
        hi: base + 19,
    }
}

impl TestRelay {
    /// A relay with test-friendly settings.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {})
    }

    /// A relay with settings adjusted by `adjust`.
    pub fn start_with(adjust: impl FnOnce(&mut RelayConfig)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = RelayConfig {
            data_dir: dir.path().join("data"),
            agent_listen: "127.0.0.1:0".parse()?,
            api_listen: "127.0.0.1:0".parse()?,
            public_host: Some("127.0.0.1".into()),
            public_bind: "127.0.0.1".parse()?,
            port_range: random_range(),
            heartbeat_interval: Duration::from_secs(1),
            ..RelayConfig::default()
        };
        adjust(&mut config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let handle = rt.block_on(start(config)).context("starting the relay")?;
        let api = format!("http://{}", handle.info.api_addr);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", handle.admin_token().expose()).parse()?,
        );
        let http = reqwest::blocking::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(20))
            .build()?;
        Ok(Self {
            rt,
            handle,
            dir,
            api,
            http,
        })
    }

    /// The agent endpoint, HOST:PORT.
    pub fn agent_addr(&self) -> String {
        self.handle.info.agent_addr.to_string()
    }

    /// The certificate pin agents use.
    pub fn pin(&self) -> String {
        self.handle.info.fingerprint.clone()
    }

    /// `POST /v1/sessions` with `services`, `grace_secs` (None: default); expects 201.
    pub fn create(&self, services: &[&str], grace_secs: Option<u64>) -> anyhow::Result<Created> {
        let extra = grace_secs
            .map(|g| json!({ "grace_secs": g }))
            .unwrap_or_else(|| json!({}));
        self.create_with(services, extra)
    }

    /// `POST /v1/sessions` with `services` and the fields of `extra` (an object, e.g.
    /// `{"allow_cidrs": ["127.0.0.1/32"]}`); expects 201.
    pub fn create_with(&self, services: &[&str], extra: Value) -> anyhow::Result<Created> {
        let mut body = json!({ "build_id": "build-42", "app_id": "app-7", "services": services });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let resp = self
            .http
            .post(format!("{}/v1/sessions", self.api))
            .json(&body)
            .send()?;
        let status = resp.status();
        let v: Value = resp.json()?;
        if status.as_u16() != 201 {
            bail!("create session answered {status}: {v}");
        }
        Ok(Created {
            id: v["session_id"].as_str().context("session_id")?.to_owned(),
            token: v["join_token"].as_str().context("join_token")?.to_owned(),
            ports: v["endpoints"]
                .as_array()
                .context("endpoints")?
                .iter()
                .map(|e| {
                    (
                        e["service"].as_str().unwrap_or("").to_owned(),
                        e["port"].as_u64().unwrap_or(0) as u16,
                    )
                })
                .collect(),
        })
    }

    /// The secret user tokens are signed with (the relay's `user-token.secret`).
    pub fn user_token_secret(&self) -> anyhow::Result<Vec<u8>> {
        let path = &self.handle.info.user_token_secret_path;
        let (secret, _) = porthole_relay::user_token::load_or_create_secret(path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(secret)
    }

    /// A valid user token (10 minutes) for `sub` on `app_id` with `roles` (one role is
    /// sent as a string, several as a list).
    pub fn user_token(&self, sub: &str, app_id: &str, roles: &[&str]) -> anyhow::Result<String> {
        use porthole_relay::user_token::{mint, Roles};
        let role = match roles {
            [one] => Roles::One((*one).to_owned()),
            many => Roles::Many(many.iter().map(|r| (*r).to_owned()).collect()),
        };
        mint(
            &self.user_token_secret()?,
            sub,
            app_id,
            role,
            Duration::from_secs(600),
        )
        .map_err(anyhow::Error::msg)
    }

    /// `GET /v1/sessions/{id}/instructions` with `Authorization: Bearer <bearer>` (none
    /// when `None`), without the admin token.
    pub fn instructions(&self, id: &str, bearer: Option<&str>) -> anyhow::Result<ApiAnswer> {
        let mut req = reqwest::blocking::Client::new()
            .get(format!("{}/v1/sessions/{id}/instructions", self.api))
            .timeout(Duration::from_secs(20));
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        ApiAnswer::of(req.send()?)
    }

    /// The audit log as written so far.
    pub fn audit_log(&self) -> anyhow::Result<String> {
        let path = &self.handle.info.audit_log_path;
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }

    /// The audit log's lines, each checked to be a JSON object with `ts` and `event`.
    pub fn audit_lines(&self) -> anyhow::Result<Vec<Value>> {
        let text = self.audit_log()?;
        let mut lines = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("audit line {} is not JSON: {line}", i + 1))?;
            if !v["ts"].is_string() || !v["event"].is_string() {
                bail!("audit line {} lacks `ts` or `event`: {line}", i + 1);
            }
            lines.push(v);
        }
        Ok(lines)
    }

    /// The session's audit lines of kind `event`, in order.
    pub fn audited(&self, event: &str, session_id: &str) -> anyhow::Result<Vec<Value>> {
        Ok(self
            .audit_lines()?
            .into_iter()
            .filter(|l| l["event"] == event && l["session_id"] == session_id)
            .collect())
    }

    /// Waits until the session has at least `count` audit lines of kind `event`; returns them.
    /// The order of events is checked through these lines, never by polling states.
    pub fn wait_audited(
        &self,
        event: &str,
        session_id: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        super::wait_for(
            &format!("{count} `{event}` audit lines for session {session_id}"),
            timeout,
            || {
                self.audited(event, session_id)
                    .ok()
                    .filter(|lines| lines.len() >= count)
            },
        )
    }

    /// Opens a TCP connection to 127.0.0.1:`port` from the local address `source` (any
    /// 127.0.0.0/8 address works on Linux loopback), as a blocking std stream, and sends an
    /// SSH client's identification line.
    pub fn connect_from(
        &self,
        source: std::net::IpAddr,
        port: u16,
    ) -> anyhow::Result<std::net::TcpStream> {
        let mut stream = self.connect_silent_from(source, port)?;
        // Speak first like an SSH client: the relay's scanner filter waits for this on SSH
        // ports (the echo services swallow it).
        std::io::Write::write_all(&mut stream, super::echo::SSH_HELLO)?;
        Ok(stream)
    }

    /// Like [`TestRelay::connect_from`], sending nothing.
    pub fn connect_silent_from(
        &self,
        source: std::net::IpAddr,
        port: u16,
    ) -> anyhow::Result<std::net::TcpStream> {
        let stream = self
            .rt
            .block_on(async {
                let socket = match source {
                    std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.bind((source, 0).into())?;
                tokio::time::timeout(
                    Duration::from_secs(10),
                    socket.connect(([127, 0, 0, 1], port).into()),
                )
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })?
            })
            .with_context(|| format!("connecting to 127.0.0.1:{port} from {source}"))?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        Ok(stream)
    }

    /// `GET /v1/sessions/{id}`.
    pub fn get(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/v1/sessions/{id}", self.api))
            .send()?
            .error_for_status()?
            .json()?)
    }

    /// The session's state.
    pub fn state(&self, id: &str) -> anyhow::Result<String> {
        Ok(self.get(id)?["state"].as_str().unwrap_or("").to_owned())
    }

    /// Waits until the session reaches `state`.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> anyhow::Result<Value> {
        super::wait_for(&format!("session {id} to be {state}"), timeout, || {
            self.get(id).ok().filter(|v| v["state"] == state)
        })
    }

    /// `POST /v1/sessions/{id}/finish`.
    pub fn finish(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .post(format!("{}/v1/sessions/{id}/finish", self.api))
            .send()?
            .error_for_status()?
            .json()?)
    }

    /// `DELETE /v1/sessions/{id}`.
    pub fn delete(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .delete(format!("{}/v1/sessions/{id}", self.api))
            .send()?
            .error_for_status()?
            .json()?)
    }
}

/// An API answer: status, `Cache-Control` header and JSON body.
#[derive(Debug, Clone)]
pub struct ApiAnswer {
    /// HTTP status code.
    pub status: u16,
    /// The `Cache-Control` header, if any.
    pub cache_control: Option<String>,
    /// The body (`Null` when it is not JSON).
    pub body: Value,
}

impl ApiAnswer {
    fn of(resp: reqwest::blocking::Response) -> anyhow::Result<Self> {
        let status = resp.status().as_u16();
        let cache_control = resp
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text()?;
        Ok(Self {
            status,
            cache_control,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        })
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.rt
            .block_on(self.handle.shutdown(Duration::from_secs(2)));
    }
}
