//! The candidates of a run and the loop that starts each one, measures it, and stops it
//! before the next starts (so they never compete for the two CPUs).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::peers::{start_bore, start_rathole, RatholeTransport};
use crate::porthole::{self, PortholeSetup};
use crate::report::CandidateResult;
use crate::suite::{self, Measurements, SuiteOptions};
use crate::tunnel::Tunnel;

/// Everything a run needs besides the target server.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Per-candidate measurement settings.
    pub suite: SuiteOptions,
    /// Include the peers, installing them when missing.
    pub peers: bool,
    /// Directory with the release `porthole-relay` and `porthole-agent`.
    pub bin_dir: PathBuf,
    /// `cargo install --root` of the peers.
    pub peers_dir: PathBuf,
    /// Scratch space: configs, data dirs, logs (one folder per candidate).
    pub work_dir: PathBuf,
    /// Run only these candidates (empty: all).
    pub only: Vec<String>,
}

/// What can be measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The client talks to the target directly: the floor every tunnel adds to.
    Direct,
    /// Porthole relay + agent, TLS data plane.
    PortholeTls,
    /// Porthole relay + agent, plain TCP data plane forwarded with splice(2).
    PortholeTcp,
    /// rathole server + client, TCP transport.
    RatholeTcp,
    /// rathole server + client, TLS transport.
    RatholeTls,
    /// bore server + `bore local`.
    Bore,
}

impl Kind {
    /// Every candidate, in report order.
    pub const ALL: [Kind; 6] = [
        Kind::Direct,
        Kind::PortholeTls,
        Kind::PortholeTcp,
        Kind::RatholeTcp,
        Kind::RatholeTls,
        Kind::Bore,
    ];

    /// Short name used in tables, JSON and `--only`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::PortholeTls => "porthole-tls",
            Kind::PortholeTcp => "porthole-tcp",
            Kind::RatholeTcp => "rathole-tcp",
            Kind::RatholeTls => "rathole-tls",
            Kind::Bore => "bore",
        }
    }

    /// One line for people.
    pub fn description(self) -> &'static str {
        match self {
            Kind::Direct => "client → target on loopback, no tunnel",
            Kind::PortholeTls => "porthole-relay + porthole-agent, TLS 1.3 data plane (rustls)",
            Kind::PortholeTcp => {
                "porthole-relay + porthole-agent, plain TCP data plane with splice(2)"
            }
            Kind::RatholeTcp => "rathole 0.5 server + client, tcp transport",
            Kind::RatholeTls => "rathole 0.5 server + client, tls transport (native-tls/OpenSSL)",
            Kind::Bore => "bore server + bore local, with a shared secret",
        }
    }

    fn is_peer(self) -> bool {
        matches!(self, Kind::RatholeTcp | Kind::RatholeTls | Kind::Bore)
    }
}

fn start(kind: Kind, opts: &RunOptions, target: SocketAddr) -> anyhow::Result<Tunnel> {
    let work = opts.work_dir.join(kind.name());
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let peers = &opts.peers_dir;
    match kind {
        Kind::Direct => Ok(Tunnel {
            visitor: target,
            procs: Vec::new(),
        }),
        Kind::PortholeTls | Kind::PortholeTcp => {
            let setup = PortholeSetup {
                bin_dir: opts.bin_dir.clone(),
                work,
                idle_conns: opts.suite.idle_conns,
                data_plane: if kind == Kind::PortholeTcp {
                    "tcp"
                } else {
                    "tls"
                },
            };
            porthole::start(&setup, target)
        }
        Kind::RatholeTcp => start_rathole(peers, opts.peers, RatholeTransport::Tcp, &work, target),
        Kind::RatholeTls => start_rathole(peers, opts.peers, RatholeTransport::Tls, &work, target),
        Kind::Bore => start_bore(peers, opts.peers, &work, target),
    }
}

/// Starts, measures and stops every selected candidate in turn.
pub fn run_all(opts: &RunOptions, target: SocketAddr) -> Vec<CandidateResult> {
    let selected = Kind::ALL.into_iter().filter(|k| {
        let wanted = opts.only.is_empty() || opts.only.iter().any(|o| o == k.name());
        wanted && (opts.peers || !k.is_peer() || !opts.only.is_empty())
    });
    let mut out = Vec::new();
    for kind in selected {
        eprintln!("== {} ({})", kind.name(), kind.description());
        let mut result = CandidateResult {
            name: kind.name().to_owned(),
            description: kind.description().to_owned(),
            available: false,
            reason: None,
            results: Measurements::default(),
        };
        match start(kind, opts, target) {
            Ok(mut tunnel) => {
                result.available = true;
                result.results = suite::run(kind.name(), &mut tunnel, &opts.suite);
                for e in &result.results.errors {
                    eprintln!("  [{}] failed: {e}", kind.name());
                }
            }
            Err(e) => {
                eprintln!("  [{}] unavailable: {e:#}", kind.name());
                result.reason = Some(format!("{e:#}"));
            }
        }
        out.push(result);
    }
    out
}
