//! The local control socket: a Unix socket next to the pid file (`<pid file>.sock`, mode
//! 0600) through which `porthole-agent status` and `porthole-agent finish [--wait]` talk to
//! the running agent.
//!
//! Line-delimited JSON: the client writes one request per line (`{"op":"status"}`,
//! `{"op":"finish","wait_if_nobody_connected_ms":2000}`, `{"op":"wait"}`); the agent
//! answers each with one line, except `wait`, which streams a line per change of the
//! agent's status (state, deadline, visitors) and notice, and closes once the session ended.
//! See [`wire`] for the shapes, [`socket`] for how the file is created and removed,
//! [`server`] for the agent's side and [`client`] for the subcommands' side.

pub mod client;
pub mod server;
pub mod socket;
pub mod wire;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The control socket of the agent whose pid file is `pid_file`: `<pid file>.sock`.
pub fn socket_path(pid_file: &Path) -> PathBuf {
    let mut name: OsString = pid_file.as_os_str().to_owned();
    name.push(".sock");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_sits_next_to_the_pid_file() {
        assert_eq!(
            socket_path(Path::new("/run/user/1000/porthole-agent.pid")),
            Path::new("/run/user/1000/porthole-agent.pid.sock")
        );
        assert_eq!(socket_path(Path::new("agent")), Path::new("agent.sock"));
    }
}
