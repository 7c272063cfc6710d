//! Control messages. Every message is one frame (see [`crate::frame`]); JSON tagged by
//! `"type"`. Unknown fields are ignored so a newer peer can add optional fields without a
//! version bump; a change of meaning bumps [`crate::limits::PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// A service a build machine exposes through the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    /// OpenSSH (or the agent's embedded SSH server).
    Ssh,
    /// VNC screen sharing (macOS build machines).
    Vnc,
}

impl Service {
    /// Every service, in display order.
    pub const ALL: [Service; 2] = [Service::Ssh, Service::Vnc];

    /// The lowercase name used in flags, JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Ssh => "ssh",
            Service::Vnc => "vnc",
        }
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Service {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ssh" => Ok(Service::Ssh),
            "vnc" => Ok(Service::Vnc),
            other => Err(format!(
                "unknown service `{other}`: expected `ssh` or `vnc`"
            )),
        }
    }
}

/// How data connections (one per visitor) travel between agent and relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPlane {
    /// TLS to the agent endpoint, like the control connection (the default).
    #[default]
    Tls,
    /// Plain TCP to a separate data port, authenticated by the one-time secret in `attach`;
    /// both ends forward with splice(2). For relays and build machines on one private network.
    Tcp,
}

impl DataPlane {
    /// The lowercase name, for flags, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DataPlane::Tls => "tls",
            DataPlane::Tcp => "tcp",
        }
    }
}

impl std::str::FromStr for DataPlane {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tls" => Ok(DataPlane::Tls),
            "tcp" => Ok(DataPlane::Tcp),
            other => Err(format!(
                "unknown data plane `{other}`: expected `tls` or `tcp`"
            )),
        }
    }
}

/// Where users reach one service of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The service behind this port.
    pub service: Service,
    /// Public host name users connect to.
    pub host: String,
    /// Public TCP port on the relay.
    pub port: u16,
}

/// Login details for one service, shown to users allowed to get the instructions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// The service they log in to.
    pub service: Service,
    /// User name.
    pub username: String,
    /// Password, if the service uses one.
    #[serde(default)]
    pub password: Option<Secret>,
}

/// How an agent proves which session its control connection belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HelloAuth {
    /// First connection of a session: the single-use join token the CI backend got from the
    /// relay's API.
    Join {
        /// The join token.
        token: Secret,
    },
    /// Reconnection after a lost link: the session id and resume secret from `registered`.
    Resume {
        /// Session to resume.
        session_id: String,
        /// Resume secret the relay gave in `registered`.
        secret: Secret,
    },
}

/// Why the relay refused something. Unknown codes from a newer relay decode as
/// [`ErrorCode::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// The join token or resume secret is not known to the relay.
    BadToken,
    /// The join token was already used; a reconnecting agent must resume instead.
    TokenUsed,
    /// The session was revoked (deadline, join TTL, API); nothing can join or resume it.
    SessionRevoked,
    /// The session already has a connected agent; a second one is refused.
    SessionBusy,
    /// The services offered do not match the session's.
    ServiceMismatch,
    /// A frame could not be decoded.
    BadFrame,
    /// A frame was larger than the limit.
    FrameTooLarge,
    /// A well-formed message arrived where it is not allowed.
    UnexpectedMessage,
    /// An `attach` named no pending visitor connection, or its secret was wrong.
    BadAttach,
    /// The peer took too long.
    Timeout,
    /// The relay is shutting down; reconnect shortly.
    ShuttingDown,
    /// A fault on the relay's side.
    Internal,
    /// A code this build does not know.
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The snake_case name (as on the wire), for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::TokenUsed => "token_used",
            ErrorCode::SessionRevoked => "session_revoked",
            ErrorCode::SessionBusy => "session_busy",
            ErrorCode::ServiceMismatch => "service_mismatch",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnexpectedMessage => "unexpected_message",
            ErrorCode::BadAttach => "bad_attach",
            ErrorCode::Timeout => "timeout",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::Other => "other",
        }
    }
}

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Agent → relay, first frame of a control connection.
    Hello {
        /// [`crate::limits::PROTOCOL_VERSION`] of the agent.
        protocol_version: u32,
        /// The agent's release, for logs and error messages.
        agent_version: String,
        /// Join token or resume secret.
        auth: HelloAuth,
        /// Services the agent can reach on the build machine.
        services: Vec<Service>,
        /// Login details users get in the remote access instructions (sent on every
        /// registration: the relay keeps them in memory only).
        #[serde(default)]
        credentials: Vec<Credential>,
        /// The build machine's SSH host public keys (`ssh-ed25519 AAAA... comment`), so users
        /// can verify the machine instead of turning host key checking off.
        #[serde(default)]
        host_keys: Vec<String>,
        /// Whether the agent takes `visitors` reports (older agents do not: the relay sends
        /// them only when this is true).
        #[serde(default)]
        visitor_reports: bool,
        /// Whether the agent takes `open_at` (a relay cluster's visitor waiting on another
        /// node; older agents do not: a cluster serves their visitors on the node holding
        /// their link only).
        #[serde(default)]
        attach_elsewhere: bool,
    },
    /// Relay → agent: the control connection is registered.
    Registered {
        /// The session this agent serves.
        session_id: String,
        /// Secret to resume the session after a lost link.
        resume_secret: Secret,
        /// Public endpoints, one per service.
        endpoints: Vec<Endpoint>,
        /// Current deadline, Unix milliseconds.
        deadline_unix_ms: u64,
        /// Interval at which both sides send `ping`; a link silent for three intervals is
        /// dead.
        heartbeat_ms: u64,
        /// `true` when this resumed an existing registration.
        resumed: bool,
        /// How visitors' data connections reach the relay.
        #[serde(default)]
        data_plane: DataPlane,
        /// With [`DataPlane::Tcp`]: the relay's plain-TCP data port (same host as the agent
        /// endpoint).
        #[serde(default)]
        data_port: Option<u16>,
        /// Secret of this link's warm data connections (`park`); absent from relays that
        /// take none. Valid while this control link lives.
        #[serde(default)]
        park_secret: Option<Secret>,
        /// Whether the relay takes `visitor_authenticated` reports (older relays do not:
        /// an agent sends them only when this is true).
        #[serde(default)]
        visitor_auth_reports: bool,
        /// Whether the relay takes `end` from the agent (older relays do not).
        #[serde(default)]
        accepts_end: bool,
    },
    /// Either way: a typed refusal; the sender closes the connection after it.
    Error {
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong and what to do, for people.
        message: String,
    },
    /// Relay → agent: a visitor connected; dial `service` and attach a data connection.
    Open {
        /// Connection id, unique within the session.
        conn_id: u64,
        /// Which local service to dial.
        service: Service,
        /// One-time secret the data connection presents in `attach`.
        secret: Secret,
    },
    /// Relay → agent (a relay cluster): like `open`, but the visitor waits on another node
    /// of the cluster: attach the data connection to `relay`, that node's agent endpoint
    /// (same certificate), instead of the node of this control link. Sent only to agents
    /// that said `attach_elsewhere` in `hello`.
    OpenAt {
        /// Connection id, unique within the session.
        conn_id: u64,
        /// Which local service to dial.
        service: Service,
        /// One-time secret the data connection presents in `attach`.
        secret: Secret,
        /// The node's agent endpoint, HOST:PORT.
        relay: String,
    },
    /// Agent → relay: the local service could not be reached; close the visitor.
    OpenFailed {
        /// Connection id from `open`.
        conn_id: u64,
        /// Why, for the relay's log.
        reason: String,
    },
    /// Agent → relay: the visitor on connection `conn_id` logged in to the agent's embedded
    /// SSH server, so it counts as a real user (it holds an `extend_while_connected`
    /// session open). Sent only to relays that said `visitor_auth_reports` in `registered`.
    VisitorAuthenticated {
        /// Connection id from `open` or `assign`.
        conn_id: u64,
    },
    /// Agent → relay, first frame of a data connection; raw bytes follow.
    Attach {
        /// Session the visitor belongs to.
        session_id: String,
        /// Connection id from `open`.
        conn_id: u64,
        /// The one-time secret from `open`.
        secret: Secret,
    },
    /// Agent → relay, first frame of a warm data connection: it waits, idle, until the relay
    /// hands it a visitor with `assign`.
    Park {
        /// The agent's session.
        session_id: String,
        /// `park_secret` from the current link's `registered`.
        secret: Secret,
    },
    /// Relay → agent on a parked data connection: it now carries this visitor; dial
    /// `service`; raw bytes follow.
    Assign {
        /// Connection id, unique within the session.
        conn_id: u64,
        /// Which local service to dial.
        service: Service,
    },
    /// Either way: heartbeat request.
    Ping {
        /// Echoed in `pong`.
        seq: u64,
    },
    /// Either way: heartbeat answer.
    Pong {
        /// The `seq` of the `ping` answered.
        seq: u64,
    },
    /// Agent → relay: the build finished; the grace period starts.
    Finish,
    /// Agent → relay: end the session now (the agent's `--wait-if-nobody-connected` ran out
    /// with nobody connected). The relay revokes it, unless a visitor is connected right now.
    /// Sent only to relays that said `accepts_end` in `registered`.
    End,
    /// Relay → agent: how many visitors are connected now (sent when the count changes, to
    /// agents that said `visitor_reports` in `hello`; the first change at once, later ones
    /// paced, at most one report every 500 ms with the latest count).
    Visitors {
        /// Visitor connections open now.
        count: u32,
    },
    /// Relay → agent: the session's deadline changed.
    Deadline {
        /// New deadline, Unix milliseconds.
        deadline_unix_ms: u64,
        /// `true` once the build finished and only the grace period remains.
        finishing: bool,
    },
    /// Relay → agent: the session is over; the agent exits.
    Revoked {
        /// Why, for people.
        reason: String,
    },
}

impl Message {
    /// The message's `type` tag, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Registered { .. } => "registered",
            Message::Error { .. } => "error",
            Message::Open { .. } => "open",
            Message::OpenAt { .. } => "open_at",
            Message::OpenFailed { .. } => "open_failed",
            Message::VisitorAuthenticated { .. } => "visitor_authenticated",
            Message::Attach { .. } => "attach",
            Message::Park { .. } => "park",
            Message::Assign { .. } => "assign",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Finish => "finish",
            Message::End => "end",
            Message::Visitors { .. } => "visitors",
            Message::Deadline { .. } => "deadline",
            Message::Revoked { .. } => "revoked",
        }
    }
}
