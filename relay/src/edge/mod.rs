//! The relay's network edge: where agents and visitors connect.
//!
//! # Layout
//! - [`source`]: the per-source key (IPv6 by /64) and per-source permit counter.
//! - [`preauth`]: pending-handshake limits for unauthenticated listeners.
//! - [`agent`]: agent connections: TLS accept, first frame, control link, data connections,
//!   warm (parked) connections, the plain-TCP data port.
//! - [`visitor`]: public ports: the port pool, guards, protocol openings (SSH line, RFB
//!   version exchange), pairing with a data connection and forwarding.

pub mod agent;
pub mod preauth;
pub mod source;
pub mod visitor;
