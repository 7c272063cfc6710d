//! Operating the relay: what it writes for operators and prepares on start.
//!
//! # Layout
//! - [`bootstrap`]: the data dir on start: TLS certificate (generated if absent), admin token.
//! - [`audit`]: the JSON-lines audit log.
//! - [`refusals`]: refusals aggregated per kind and interval, so floods cannot fill the disk.
//! - [`metrics`]: Prometheus metrics (per-relay registry, bounded labels).

pub mod audit;
pub mod bootstrap;
pub mod metrics;
pub mod refusals;
