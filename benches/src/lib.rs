//! `porthole-bench`: measures Porthole side by side with direct loopback and the tunnels
//! people use today (rathole, bore), all on this machine's loopback.
//!
//! # Layout
//! - [`target`]: the target server behind every tunnel (echo, sink, source on one port).
//! - [`tunnel`]: a running candidate (visitor address + processes), process spawning and
//!   readiness checks.
//! - [`porthole`]: Porthole's release relay and agent as a candidate, set up through the API.
//! - [`peers`]: rathole (TCP, TLS) and bore, installed with `cargo install` when missing.
//! - [`http`]: the tiny HTTP/1.1 client the harness uses for the relay's API.
//! - [`bulk`]: single-stream upload and download with 256 KiB writes.
//! - [`latency`]: ping-pong, connect → first byte, ping-pong under bulk load.
//! - [`procfs`]: CPU time and RSS of tunnel processes, open-file limit, machine facts.
//! - [`stats`]: percentiles, throughput, ratios.
//! - [`suite`]: the steps run against one candidate and what they record.
//! - [`run`]: the candidates and the loop over them.
//! - [`report`]: metrics, text tables, ratios, the JSON document.
//! - [`restart`]: the `restart` mode: time until N live sessions are active again after a
//!   relay restart (graceful and crash).
//! - [`cluster`]: the `cluster` mode: three relay nodes on one etcd (creates per second,
//!   DELETE → closed everywhere, throughput through the owner and another node, failover).
//! - [`cluster_report`]: the `cluster` mode's markdown table, from the recorded rounds.
//! - [`sources`]: loopback forwarders that give each agent its own source address.
//! - [`svg`]: the bar chart.

pub mod bulk;
pub mod cluster;
pub mod cluster_report;
pub mod http;
pub mod latency;
pub mod peers;
pub mod porthole;
pub mod procfs;
pub mod report;
pub mod restart;
pub mod run;
pub mod sources;
pub mod stats;
pub mod suite;
pub mod svg;
pub mod target;
pub mod tunnel;
