//! Shared helpers for the relay's integration tests: an in-process relay on loopback (agent
//! endpoint and API on port 0, public ports in a small random range), an HTTP client that
//! carries its admin token, and probes for public ports and API timestamps.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

pub mod deploy_files;

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use porthole_relay::config::PortRange;
use porthole_relay::{RelayConfig, RelayHandle};
use rand::Rng;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Client, RequestBuilder, StatusCode};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Public ports used by tests: above the relay's unit tests' usual ranges and below the
/// kernel's ephemeral range.
const TEST_PORTS_LO: u16 = 23000;
/// Last port tests may use.
const TEST_PORTS_HI: u16 = 29999;
/// Ports per slot; every relay of one test binary gets its own slot.
const SLOT_LEN: u16 = 25;
/// Public ports given to a relay unless a test asks for another count.
pub const DEFAULT_RANGE_LEN: u16 = 20;

/// Longest a probe waits for a public port to close after revocation.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Pause between two probes of a port that should close.
const CLOSE_POLL: Duration = Duration::from_millis(50);
/// Longest a read from a public port may block before the test gives up.
const READ_LIMIT: Duration = Duration::from_secs(5);

/// A public port range of `len` ports inside 23000-29999. The first slot of a test binary
/// is random, later relays of the same binary take the following slots, so relays of one
/// binary never share ports; collisions with other processes only make the pool skip ports.
pub fn port_range(len: u16) -> PortRange {
    assert!(
        (1..=SLOT_LEN).contains(&len),
        "a test range holds 1 to {SLOT_LEN} ports"
    );
    static NEXT_SLOT: OnceLock<AtomicU16> = OnceLock::new();
    let slots = (TEST_PORTS_HI - TEST_PORTS_LO + 1) / SLOT_LEN;
    let next = NEXT_SLOT.get_or_init(|| AtomicU16::new(rand::thread_rng().gen_range(0..slots)));
    let slot = next.fetch_add(1, Ordering::Relaxed) % slots;
    let lo = TEST_PORTS_LO + slot * SLOT_LEN;
    PortRange {
        lo,
        hi: lo + len - 1,
    }
}

/// An in-process relay with its data dir and an authenticated API client.
#[derive(Debug)]
pub struct TestRelay {
    /// The running relay.
    pub handle: RelayHandle,
    /// Its data dir (removed on drop).
    pub dir: TempDir,
    /// `http://127.0.0.1:<api port>`.
    pub base: String,
    /// A client that sends `Authorization: Bearer <admin token>` on every request.
    pub client: Client,
    /// The public port range.
    pub range: PortRange,
}

impl TestRelay {
    /// A relay with default settings and [`DEFAULT_RANGE_LEN`] public ports.
    pub async fn start() -> Result<Self> {
        Self::start_with(DEFAULT_RANGE_LEN, |_| {}).await
    }

    /// A relay with `range_len` public ports and settings adjusted by `tweak`.
    pub async fn start_with(range_len: u16, tweak: impl FnOnce(&mut RelayConfig)) -> Result<Self> {
        let dir = tempfile::tempdir().context("creating the data dir")?;
        let range = port_range(range_len);
        let mut config = RelayConfig {
            data_dir: dir.path().to_path_buf(),
            agent_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            api_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            public_host: Some("127.0.0.1".to_owned()),
            public_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port_range: range,
            ..Default::default()
        };
        tweak(&mut config);
        let handle = porthole_relay::start(config)
            .await
            .context("starting the relay")?;
        let base = format!("http://{}", handle.info.api_addr);
        let mut headers = HeaderMap::new();
        let bearer = format!("Bearer {}", handle.admin_token().expose());
        headers.insert(AUTHORIZATION, HeaderValue::from_str(&bearer)?);
        let client = Client::builder().default_headers(headers).build()?;
        Ok(Self {
            handle,
            dir,
            base,
            client,
            range,
        })
    }

    /// The absolute URL of an API path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /v1/sessions` with a JSON body.
    pub async fn create(&self, body: &Value) -> Result<(StatusCode, Value)> {
        send(self.client.post(self.url("/v1/sessions")).json(body)).await
    }

    /// `POST /v1/sessions` with a raw body sent as `application/json`.
    pub async fn create_raw(&self, body: &'static str) -> Result<(StatusCode, Value)> {
        let req = self
            .client
            .post(self.url("/v1/sessions"))
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        send(req).await
    }

    /// Creates a session that must succeed; returns the `201` body.
    pub async fn create_ok(&self, body: &Value) -> Result<Value> {
        let (status, created) = self.create(body).await?;
        ensure!(
            status == StatusCode::CREATED,
            "create answered {status}: {created}"
        );
        Ok(created)
    }

    /// Authenticated `GET`.
    pub async fn get(&self, path: &str) -> Result<(StatusCode, Value)> {
        send(self.client.get(self.url(path))).await
    }

    /// Authenticated `POST` without a body.
    pub async fn post(&self, path: &str) -> Result<(StatusCode, Value)> {
        send(self.client.post(self.url(path))).await
    }

    /// Authenticated `DELETE`.
    pub async fn delete(&self, path: &str) -> Result<(StatusCode, Value)> {
        send(self.client.delete(self.url(path))).await
    }

    /// `GET /v1/sessions/{id}` that must succeed.
    pub async fn session(&self, id: &str) -> Result<Value> {
        let (status, view) = self.get(&format!("/v1/sessions/{id}")).await?;
        ensure!(
            status == StatusCode::OK,
            "GET session {id} answered {status}: {view}"
        );
        Ok(view)
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        // Stops listeners and tasks even if the test's runtime outlives this relay.
        self.handle.relay.cancel.cancel();
    }
}

/// Sends a request; returns the status and the JSON body (`Null` when empty).
pub async fn send(req: RequestBuilder) -> Result<(StatusCode, Value)> {
    let resp = req.send().await.context("sending the API request")?;
    let status = resp.status();
    let bytes = resp.bytes().await.context("reading the API answer")?;
    if bytes.is_empty() {
        return Ok((status, Value::Null));
    }
    let body = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "answer ({status}) is not JSON: {}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    Ok((status, body))
}

/// A string field of a JSON object.
pub fn str_field<'a>(v: &'a Value, field: &str) -> Result<&'a str> {
    v.get(field)
        .and_then(Value::as_str)
        .with_context(|| format!("no string field `{field}` in {v}"))
}

/// An RFC 3339 timestamp field of a JSON object.
pub fn time_field(v: &Value, field: &str) -> Result<SystemTime> {
    let text = str_field(v, field)?;
    humantime::parse_rfc3339(text).with_context(|| format!("`{field}` = {text:?} is not RFC 3339"))
}

/// The public ports of a session (from `endpoints`).
pub fn ports(v: &Value) -> Result<Vec<u16>> {
    let endpoints = v
        .get("endpoints")
        .and_then(Value::as_array)
        .with_context(|| format!("no `endpoints` array in {v}"))?;
    endpoints
        .iter()
        .map(|e| {
            e.get("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .with_context(|| format!("endpoint without a valid port: {e}"))
        })
        .collect()
}

/// Asserts `t` lies within `tolerance` of `expected`.
pub fn assert_near(what: &str, t: SystemTime, expected: SystemTime, tolerance: Duration) {
    let diff = t.duration_since(expected).unwrap_or_else(|e| e.duration());
    assert!(
        diff <= tolerance,
        "{what}: {} is {diff:?} away from {} (tolerance {tolerance:?})",
        humantime::format_rfc3339_millis(t),
        humantime::format_rfc3339_millis(expected),
    );
}

/// A public port of a session that has no agent: the relay accepts the connection, then
/// closes it without sending a byte.
pub async fn expect_accepted_then_closed(port: u16) -> Result<()> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .with_context(|| format!("connecting to public port {port}"))?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(READ_LIMIT, stream.read(&mut buf))
        .await
        .with_context(|| format!("port {port} kept the connection open without an agent"))?
        .with_context(|| format!("reading from port {port}"))?;
    ensure!(
        n == 0,
        "port {port} sent {n} bytes without an agent: {:?}",
        &buf[..n]
    );
    Ok(())
}

/// Waits (bounded) until connecting to `port` is refused: its listener was closed.
pub async fn expect_refused(port: u16) -> Result<()> {
    let until = tokio::time::Instant::now() + CLOSE_WAIT;
    loop {
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(()),
            Err(e) => bail!("connecting to port {port} failed other than refused: {e}"),
            Ok(_) if tokio::time::Instant::now() >= until => {
                bail!("port {port} still accepts connections {CLOSE_WAIT:?} after revocation")
            }
            Ok(_) => tokio::time::sleep(CLOSE_POLL).await,
        }
    }
}
