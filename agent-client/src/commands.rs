//! The `finish` and `status` subcommands: they talk to the running agent through its control
//! socket and print for the build log.

use std::path::Path;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use porthole_agent::exit;
use porthole_agent::local::client::{Client, ClientError};
use porthole_agent::local::wire::{Reply, Request};
use porthole_agent::pidfile::signal_agent;
use porthole_agent::print::time_and_left;
use porthole_agent::status::{EndKind, State, Status};

/// How long a subcommand waits for the agent's answer to one request (`finish` waits up to
/// 5 s for the relay before answering).
const ANSWER: Duration = Duration::from_secs(30);

/// A failed subcommand: what to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// Printed after `porthole-agent: error: `.
    pub message: String,
    /// [`exit`] code.
    pub code: u8,
}

impl Failure {
    /// A fatal error ([`exit::ERROR`]).
    pub fn error(message: String) -> Self {
        Self {
            message,
            code: exit::ERROR,
        }
    }

    fn client(e: ClientError) -> Self {
        let code = match e {
            ClientError::NoAgent(_) => exit::NO_AGENT,
            ClientError::TimedOut | ClientError::Other(_) => exit::ERROR,
        };
        Self {
            message: e.to_string(),
            code,
        }
    }
}

/// `porthole-agent finish [--wait] [--wait-if-nobody-connected D]`.
pub fn finish(pid_file: &Path, wait: bool, within: Option<Duration>) -> Result<(), Failure> {
    let mut client = match Client::connect(pid_file) {
        Ok(client) => client,
        // An agent without a control socket (an older one): the signal still works, but
        // only for a plain `finish`.
        Err(ClientError::NoAgent(_)) if !wait && within.is_none() && pid_file.exists() => {
            let pid = signal_agent(pid_file, Signal::SIGUSR1).map_err(Failure::error)?;
            println!("porthole-agent: told the agent (pid {pid}) that the build finished; the grace period starts");
            return Ok(());
        }
        Err(e) => return Err(Failure::client(e)),
    };
    let request = Request::Finish {
        wait_if_nobody_connected_ms: within.map(|d| d.as_millis() as u64),
    };
    let status = match client.ask(&request, ANSWER).map_err(Failure::client)? {
        Reply::Finished { status } => status,
        other => {
            return Err(Failure::error(format!(
                "unexpected answer from the agent: {other:?}"
            )))
        }
    };
    println!(
        "porthole-agent: told the agent (pid {}) that the build finished; the grace period starts",
        status.pid
    );
    match (status.finishing, status.deadline()) {
        (true, Some(deadline)) => println!(
            "porthole-agent: remote access ends at {}",
            time_and_left(deadline, SystemTime::now())
        ),
        _ if status.end.is_none() => println!(
            "porthole-agent: the relay has not confirmed yet (state {}); the agent tells it as \
             soon as it can",
            status.state.as_str()
        ),
        _ => {}
    }
    if !wait {
        return Ok(());
    }
    wait_for_end(&mut client, status)
}

/// Streams the agent's status until the session ends; prints each change.
fn wait_for_end(client: &mut Client, mut last: Status) -> Result<(), Failure> {
    client.send(&Request::Wait).map_err(Failure::client)?;
    println!(
        "porthole-agent: waiting for session {} to end",
        last.session_id.as_deref().unwrap_or("(not registered yet)")
    );
    loop {
        let reply = client.next(None).map_err(Failure::client)?;
        let status = match reply {
            Some(Reply::Status { status }) => status,
            Some(Reply::Notice { message }) => {
                println!("porthole-agent: {message}");
                continue;
            }
            Some(Reply::Error { message }) => {
                return Err(Failure::error(format!(
                    "the agent refused to wait: {message}"
                )))
            }
            Some(Reply::Finished { .. }) => continue,
            None => {
                return Err(Failure::error(
                    "the agent went away before the session ended (see its log)".into(),
                ))
            }
        };
        print_changes(&last, &status);
        if let Some(end) = &status.end {
            return match end.kind {
                EndKind::Revoked => {
                    println!("porthole-agent: session ended: {}", end.reason);
                    Ok(())
                }
                EndKind::Stopped | EndKind::Failed => Err(Failure::error(format!(
                    "the agent ended before the session did: {}",
                    end.reason
                ))),
            };
        }
        last = status;
    }
}

/// The lines for what changed between two statuses (deadline, visitors, link state).
fn print_changes(before: &Status, now: &Status) {
    if now.deadline_unix_ms != before.deadline_unix_ms || now.finishing && !before.finishing {
        if let Some(deadline) = now.deadline() {
            println!(
                "porthole-agent: remote access ends at {}",
                time_and_left(deadline, SystemTime::now())
            );
        }
    }
    if now.visitors != before.visitors {
        let what = if now.visitors > before.visitors {
            "a user connected"
        } else {
            "a user left"
        };
        println!("porthole-agent: {what} ({} now)", now.visitors);
    }
    if now.state != before.state && now.end.is_none() {
        match now.state {
            State::Reconnecting => println!(
                "porthole-agent: the link to the relay is down, reconnecting ({})",
                now.last_error.as_deref().unwrap_or("no details")
            ),
            State::Active | State::Finishing if before.state == State::Reconnecting => {
                println!("porthole-agent: the link to the relay is back")
            }
            _ => {}
        }
    }
}

/// `porthole-agent status [--json]`.
pub fn status(pid_file: &Path, json: bool) -> Result<(), Failure> {
    let mut client = Client::connect(pid_file).map_err(Failure::client)?;
    let status = match client
        .ask(&Request::Status, ANSWER)
        .map_err(Failure::client)?
    {
        Reply::Status { status } => status,
        other => {
            return Err(Failure::error(format!(
                "unexpected answer from the agent: {other:?}"
            )))
        }
    };
    if json {
        println!("{}", serde_json::to_string(&status).unwrap_or_default());
    } else {
        for line in status_lines(&status, SystemTime::now()) {
            println!("{line}");
        }
    }
    match &status.end {
        None => Ok(()),
        Some(end) => Err(Failure {
            message: format!("the session ended: {}", end.reason),
            code: exit::SESSION_ENDED,
        }),
    }
}

/// `porthole-agent status` as lines.
fn status_lines(status: &Status, now: SystemTime) -> Vec<String> {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut lines = vec![format!("state: {}", status.state.as_str())];
    if let Some(id) = &status.session_id {
        lines.push(format!("session: {id}"));
    }
    if let Some(deadline) = status.deadline() {
        lines.push(format!("deadline: {}", time_and_left(deadline, now)));
    }
    lines.push(format!("visitors connected now: {}", status.visitors));
    lines.push(format!(
        "a user connected during the session: {}",
        yes_no(status.visited)
    ));
    lines.push(format!("build finished: {}", yes_no(status.finishing)));
    for e in &status.endpoints {
        lines.push(format!("endpoint: {} {}:{}", e.service, e.host, e.port));
    }
    if let Some(error) = &status.last_error {
        lines.push(format!("last link error: {error}"));
    }
    if let Some(end) = &status.end {
        lines.push(format!("ended: {}", end.reason));
    }
    lines.push(format!("agent pid: {}", status.pid));
    lines
}

#[cfg(test)]
mod tests {
    use porthole_protocol::{Endpoint, Service};

    use super::*;

    #[test]
    fn status_lines_name_state_deadline_and_visitors() {
        let status = Status {
            pid: 42,
            state: State::Finishing,
            session_id: Some("s_1".into()),
            endpoints: vec![Endpoint {
                service: Service::Ssh,
                host: "relay.example.com".into(),
                port: 20417,
            }],
            deadline_unix_ms: Some(90_000),
            visitors: 2,
            visited: true,
            finishing: true,
            ..Status::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(30);
        let text = status_lines(&status, now).join("\n");
        for want in [
            "state: finishing",
            "session: s_1",
            "deadline: 1970-01-01T00:01:30Z (in 1m)",
            "visitors connected now: 2",
            "a user connected during the session: yes",
            "endpoint: ssh relay.example.com:20417",
            "agent pid: 42",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }
}
