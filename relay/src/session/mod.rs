//! Sessions: the durable facts and lifecycle of each session, what lives only in this
//! process while it runs, and the operations that move it through its life.
//!
//! # Layout (in data-flow order)
//! - [`lifecycle`]: the pure state machine and its deadlines (no clock read).
//! - [`runtime`]: one live session on this node ([`runtime::Session`]): its fixed facts, the
//!   lifecycle under a lock, the agent link, visitors waiting for a data connection.
//! - [`access`]: credentials and SSH host keys reported by the agent (memory only).
//! - [`data_conn`]: a visitor's data connection from the agent, by data plane.
//! - [`warm_pool`]: one session's queue of parked warm data connections.
//! - [`registry`]: [`registry::SessionRegistry`], the sessions by id and join token (the only
//!   holder of the maps).
//! - [`actions`]: create, join, resume, confirm, finish, revoke, purge; `actions::activate`
//!   brings a session up on this node (listeners, supervisor) for both create and restore.
//! - [`refusal`]: why an agent's registration is refused (typed, with its error code).
//! - [`persist`]: sessions to and from the store (written before a peer is told; restored on
//!   start).
//! - [`mirror`]: cluster mode: applying the records other nodes write (adopt, update,
//!   revoke here, forget; a dead owner's sessions wait for their agents).
//! - [`supervisor`]: the per-session task that enforces deadlines.

pub mod access;
pub mod actions;
#[cfg(test)]
mod actions_tests;
pub mod data_conn;
pub mod lifecycle;
pub mod mirror;
pub mod persist;
pub mod refusal;
pub mod registry;
pub mod runtime;
pub mod supervisor;
pub mod warm_pool;
