//! Agent connections, from accept to a live link.
//!
//! # Layout (in data-flow order)
//! - [`accept`]: TLS accept and first-frame dispatch (`hello`, `attach`, `park`).
//! - [`conn`]: the framed agent connection type; refusing and saying goodbye.
//! - [`control`]: a registered agent's control link (heartbeats, finish, end, open flow).
//! - [`attach`]: pairing a data connection (`attach`) with the visitor waiting for it.
//! - [`park`]: serving one warm data connection until a visitor gets it.
//! - [`data_port`]: the plain-TCP data port of the `tcp` data plane.

pub mod accept;
pub mod attach;
pub mod conn;
pub mod control;
pub mod data_port;
pub mod park;
