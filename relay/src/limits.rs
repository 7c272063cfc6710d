//! Relay limits and internal constants that are not settings.

use std::time::Duration;

/// Backlog of each public session listener.
pub const PUBLIC_LISTEN_BACKLOG: u32 = 1024;

/// Backlog of the agent endpoint and API listeners.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Messages queued toward one agent's control connection before visitors are refused.
pub const CONTROL_QUEUE: usize = 256;

/// Pause after an accept error (EMFILE and friends) before accepting again.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Longest a deadline supervisor sleeps before looking at the wall clock again (catches
/// clock jumps).
pub const SUPERVISOR_MAX_SLEEP: Duration = Duration::from_secs(30);

/// Longest build id / app id accepted by the API.
pub const MAX_ID_LEN: usize = 256;

/// Longest max_lifetime a session may ask for.
pub const MAX_SESSION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// API connections one source (IPv4 address, IPv6 /64) may hold at once, per listener.
pub const MAX_API_CONNECTIONS_PER_SOURCE: usize = 16;

/// An API connection is closed (gracefully) after this long, so a client that stops reading
/// its answers cannot hold a connection slot.
pub const API_CONNECTION_MAX_AGE: Duration = Duration::from_secs(60);

/// How long an API connection past its age may take to finish its request in flight.
pub const API_CONNECTION_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Largest API request body.
pub const MAX_API_BODY: usize = 64 * 1024;

/// After the drain, how long shutdown waits for the remaining tasks to end.
pub const FINAL_SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// Least time between two `visitors` reports on one control link (the first goes out at
/// once): a busy session's count changes with every visitor, its agent needs only the news.
pub const VISITOR_REPORT_INTERVAL: Duration = Duration::from_millis(500);

/// Time allowed to write the final `revoked`/`error` frame to an agent before closing.
pub const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

/// Agent connections one source address may have in the handshake phase at once (agents
/// need one control and a few data handshakes at a time).
pub const MAX_PENDING_HANDSHAKES_PER_IP: usize = 64;

/// Visitors (all sessions) that may be completing their protocol's opening at once (SSH
/// identification line, VNC version reply).
pub const MAX_PENDING_VISITORS: usize = 4096;

/// Visitors from one source (IPv4 address, IPv6 /64) that may be completing their protocol's
/// opening at once, over all sessions.
pub const MAX_PENDING_VISITORS_PER_IP: usize = 32;

/// Bytes of an SSH client's identification line read before deciding (RFC 4253 allows 255).
pub const SSH_BANNER_MAX: usize = 255;

/// Largest `max_visitors` a session may ask for.
pub const MAX_VISITORS_PER_SESSION: usize = 1024;

/// Most networks a session's `allow_cidrs` may list.
pub const MAX_ALLOW_CIDRS: usize = 64;

/// Longest wait for one etcd request, its retries included (cluster mode): past it the
/// operation fails with "etcd unavailable" (the API answers 503, within 5 s of the request)
/// instead of hanging. Long enough for an etcd cluster to elect a new leader.
pub const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_millis(4500);

/// Longest wait for a TCP connection to an etcd endpoint.
pub const ETCD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Watch reconnection backoff (cluster mode): first wait, doubled up to the maximum.
pub const ETCD_RETRY_MIN: Duration = Duration::from_millis(200);

/// Longest wait between two attempts to re-establish a watch or a lease.
pub const ETCD_RETRY_MAX: Duration = Duration::from_secs(5);

/// Shortest port cooldown of a cluster node's own pool: etcd's leases (which hold a revoked
/// session's ports cluster-wide) count whole seconds, with a minimum of about 2 s.
pub const CLUSTER_MIN_PORT_COOLDOWN: Duration = Duration::from_secs(3);
