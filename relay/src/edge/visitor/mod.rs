//! Visitors on the public session ports.
//!
//! # Layout (in data-flow order)
//! - [`ports`]: the public port pool with cooldown.
//! - [`guards`]: allowed source CIDRs and per-source-IP rate limits; why a visitor is refused.
//! - [`scanner`]: SSH ports wait for the client's `SSH-2.0-` line before bothering the agent.
//! - [`rfb`]: VNC ports speak the RFB version exchange and wait for the viewer's reply first.
//! - [`public`]: accepting visitors, pairing each with a data connection.
//! - [`forward`]: a paired visitor: its identity for logs and refusals, and forwarding it.
//! - [`remote`]: cluster mode: visitors whose session's agent another node holds (one hop).

pub mod forward;
pub mod guards;
pub mod ports;
pub mod public;
pub mod remote;
pub mod rfb;
pub mod scanner;
