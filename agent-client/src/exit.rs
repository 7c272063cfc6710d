//! The exit codes of `porthole-agent` and its subcommands (documented in `docs/ci.md`).

/// Success: the session ended normally (`run`, `finish --wait`), the agent is registered
/// (`--detach`), or the session lives (`status`).
pub const OK: u8 = 0;
/// A fatal error: bad settings, a refused token, no registration within
/// `--connect-timeout` (`--detach`), or an agent that stopped before its session ended
/// (`finish --wait`).
pub const ERROR: u8 = 1;
/// Bad command-line usage (clap's code).
pub const USAGE: u8 = 2;
/// No porthole-agent is running for the pid file (`status`, `finish`).
pub const NO_AGENT: u8 = 3;
/// The agent still runs but its session has ended or failed (`status`).
pub const SESSION_ENDED: u8 = 4;
