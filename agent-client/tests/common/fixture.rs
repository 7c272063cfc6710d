//! The setup most end-to-end tests share: a session on a relay whose real agent forwards
//! its services to a fresh TCP echo service (or to given local ports), registered and
//! ready for visitors.
//!
//! ```ignore
//! let relay = TestRelay::start()?;
//! let tunnel = Tunnel::start(&relay)?; // `ssh` to an echo service
//! echo::roundtrip(tunnel.port("ssh"), b"hi")?;
//! let tunnel = Tunnel::builder()
//!     .service("vnc")                                // `vnc` to the echo service too
//!     .forward("ssh", sshd.port)                     // `ssh` to a real sshd instead
//!     .session_fields(json!({ "grace_secs": 3 }))    // more `POST /v1/sessions` fields
//!     .args(["--warm-connections", "0"])             // more agent flags
//!     .start(&relay)?;
//! ```

use anyhow::Context as _;
use serde_json::{json, Value};

use super::agent::Agent;
use super::echo::{self, Accepted};
use super::relay::{Created, TestRelay};
use super::relay_process::{RelayProcess, RelaySetup};

/// A session whose agent registered and forwards its services. Dropping it stops the agent
/// (the echo service lives until the test process ends).
pub struct Tunnel {
    /// The session, as the create call answered.
    pub session: Created,
    /// The agent serving it.
    pub agent: Agent,
    /// The echo service's port and connection counter, when a service forwards to it.
    echo: Option<(u16, Accepted)>,
}

/// Where a service forwards to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The tunnel's echo service.
    Echo,
    /// 127.0.0.1:PORT.
    Port(u16),
}

/// How to set up a [`Tunnel`]: by default one `ssh` service forwarded to a fresh echo
/// service, a session with no extra fields, an agent with no extra flags dialling the
/// relay's agent endpoint directly.
#[derive(Debug, Clone)]
pub struct TunnelBuilder {
    /// The session's services in request order, each with its target.
    services: Vec<(String, Target)>,
    /// More fields for `POST /v1/sessions` (an object).
    fields: Value,
    /// More agent flags, after `--relay`, `--pin-sha256` and the `--service`s.
    args: Vec<String>,
    /// The address the agent dials instead of the relay's agent endpoint (a proxy).
    via: Option<String>,
}

impl Default for TunnelBuilder {
    fn default() -> Self {
        Self {
            services: vec![("ssh".to_owned(), Target::Echo)],
            fields: json!({}),
            args: Vec::new(),
            via: None,
        }
    }
}

impl TunnelBuilder {
    /// Adds `name` to the session's services, forwarded to the echo service.
    pub fn service(self, name: &str) -> Self {
        self.target(name, Target::Echo)
    }

    /// Forwards `name` to 127.0.0.1:`port` instead of the echo service (adding it to the
    /// session's services if it is not there yet).
    pub fn forward(self, name: &str, port: u16) -> Self {
        self.target(name, Target::Port(port))
    }

    /// Sets where `name` forwards to, keeping its place in the service list.
    fn target(mut self, name: &str, target: Target) -> Self {
        match self.services.iter_mut().find(|(s, _)| s == name) {
            Some((_, t)) => *t = target,
            None => self.services.push((name.to_owned(), target)),
        }
        self
    }

    /// More fields for the session's create call (an object, e.g. `{"max_visitors": 4}`).
    pub fn session_fields(mut self, fields: Value) -> Self {
        self.fields = fields;
        self
    }

    /// More agent flags (e.g. `--ssh-user`, `--warm-connections 0`).
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Makes the agent dial `addr` (e.g. a [`super::proxy::Proxy`]) instead of the relay's
    /// agent endpoint; the relay's pin still applies.
    pub fn via(mut self, addr: &str) -> Self {
        self.via = Some(addr.to_owned());
        self
    }

    /// Sets the tunnel up on the in-process `relay`.
    pub fn start(self, relay: &TestRelay) -> anyhow::Result<Tunnel> {
        let echo = self.echo()?;
        let names: Vec<&str> = self.services.iter().map(|(s, _)| s.as_str()).collect();
        let session = relay
            .create_with(&names, self.fields.clone())
            .context("creating the tunnel's session")?;
        self.finish(echo, session, &relay.agent_addr(), &relay.pin())
    }

    /// Sets the tunnel up on the relay binary `relay` started from `setup`. Sessions are
    /// created with [`RelaySetup::create_session`], so only the default `ssh` service is
    /// possible here.
    pub fn start_process(self, setup: &RelaySetup, relay: &RelayProcess) -> anyhow::Result<Tunnel> {
        let names: Vec<&str> = self.services.iter().map(|(s, _)| s.as_str()).collect();
        anyhow::ensure!(
            names == ["ssh"],
            "a tunnel on a relay process has one `ssh` service, not {names:?}"
        );
        let echo = self.echo()?;
        let (id, token, port) = setup
            .create_session(&relay.api, self.fields.clone())
            .context("creating the tunnel's session")?;
        let session = Created {
            id,
            token,
            ports: vec![("ssh".to_owned(), port)],
        };
        let agent_addr = format!("127.0.0.1:{}", setup.agent_port);
        self.finish(echo, session, &agent_addr, &relay.pin)
    }

    /// A fresh echo service, if a service forwards to one.
    fn echo(&self) -> anyhow::Result<Option<(u16, Accepted)>> {
        if !self.services.iter().any(|(_, t)| *t == Target::Echo) {
            return Ok(None);
        }
        echo::start_counting()
            .context("starting the tunnel's echo service")
            .map(Some)
    }

    /// Starts the agent for `session` against `agent_addr` (or the proxy) with `pin` and
    /// waits until it registered.
    fn finish(
        self,
        echo: Option<(u16, Accepted)>,
        session: Created,
        agent_addr: &str,
        pin: &str,
    ) -> anyhow::Result<Tunnel> {
        let mut args = vec![
            "--relay".to_owned(),
            self.via.unwrap_or_else(|| agent_addr.to_owned()),
            "--pin-sha256".into(),
            pin.to_owned(),
        ];
        for (name, target) in &self.services {
            let port = match (target, &echo) {
                (Target::Port(port), _) => *port,
                (Target::Echo, Some((port, _))) => *port,
                (Target::Echo, None) => anyhow::bail!("`{name}` forwards to no echo service"),
            };
            args.push("--service".into());
            args.push(format!("{name}=127.0.0.1:{port}"));
        }
        args.extend(self.args);
        let agent = Agent::spawn(&args, &session.token).context("starting the tunnel's agent")?;
        agent
            .wait_registered()
            .with_context(|| format!("the agent of session {} registering", session.id))?;
        Ok(Tunnel {
            session,
            agent,
            echo,
        })
    }
}

impl Tunnel {
    /// How to set up a tunnel other than the default one.
    pub fn builder() -> TunnelBuilder {
        TunnelBuilder::default()
    }

    /// The default tunnel on `relay`: `ssh` forwarded to a fresh echo service.
    pub fn start(relay: &TestRelay) -> anyhow::Result<Self> {
        Self::builder().start(relay)
    }

    /// The public port of `service`.
    pub fn port(&self, service: &str) -> u16 {
        self.session.port(service)
    }

    /// The echo service's port.
    pub fn echo_port(&self) -> anyhow::Result<u16> {
        self.echo
            .as_ref()
            .map(|(port, _)| *port)
            .context("no service of this tunnel forwards to an echo service")
    }

    /// The connections the echo service accepted (to prove a refused visitor never reached
    /// it).
    pub fn accepted(&self) -> anyhow::Result<&Accepted> {
        self.echo
            .as_ref()
            .map(|(_, accepted)| accepted)
            .context("no service of this tunnel forwards to an echo service")
    }
}
