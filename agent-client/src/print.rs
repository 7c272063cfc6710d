//! The build-log lines of the agent: its events, and the remote access instructions. Never
//! a token or a password: build logs are read by many, including users who may not get
//! remote access.

use std::time::{Duration, SystemTime};

use porthole_protocol::{Credential, Endpoint, Service};

use crate::events::AgentEvent;

/// `2026-11-24T22:50:14Z`.
pub fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `2026-11-24T22:50:14Z (in 9m 58s)`, or `(passed)` for a time before `now`.
pub fn time_and_left(t: SystemTime, now: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(left) => {
            let left = Duration::from_secs(left.as_secs());
            format!("{} (in {})", time(t), humantime::format_duration(left))
        }
        Err(_) => format!("{} (passed)", time(t)),
    }
}

/// The instructions printed once the session is registered: session id, deadline and one
/// line per endpoint with the `ssh` command (passwords are only on the instructions page).
pub fn instructions(
    session_id: &str,
    endpoints: &[Endpoint],
    deadline: SystemTime,
    logins: &[Credential],
) -> Vec<String> {
    let login = |service: Service| logins.iter().find(|c| c.service == service);
    let mut lines = vec![
        format!(
            "porthole-agent: remote access session {session_id} is open until {}",
            time(deadline)
        ),
        "Remote access instructions (passwords are on the remote access instructions page):"
            .to_owned(),
    ];
    for e in endpoints {
        let user = login(e.service)
            .map(|c| c.username.as_str())
            .unwrap_or("<user>");
        let has_password = login(e.service).is_some_and(|c| c.password.is_some());
        let password = if has_password {
            "password: on the instructions page"
        } else {
            "key authentication"
        };
        lines.push(match e.service {
            Service::Ssh => format!(
                "  ssh  {}:{}  ssh -p {} {user}@{}  ({password})",
                e.host, e.port, e.port, e.host
            ),
            Service::Vnc => format!(
                "  vnc  {}:{}  VNC viewer, user {user}  ({password})",
                e.host, e.port
            ),
        });
    }
    lines
}

/// The build-log lines for one event (`logins`: the agent's credentials, for user names).
pub fn event(event: &AgentEvent, logins: &[Credential]) -> Vec<String> {
    match event {
        AgentEvent::Registered {
            session_id,
            endpoints,
            deadline,
            resumed,
        } => {
            if *resumed {
                vec![format!("porthole-agent: resumed session {session_id}")]
            } else {
                instructions(session_id, endpoints, *deadline, logins)
            }
        }
        AgentEvent::Deadline {
            deadline,
            finishing,
        } => {
            if *finishing {
                vec![format!(
                    "porthole-agent: build finished; remote access ends at {}",
                    time(*deadline)
                )]
            } else {
                vec![format!(
                    "porthole-agent: remote access now ends at {}",
                    time(*deadline)
                )]
            }
        }
        AgentEvent::Visitors { count, previous } => {
            let what = if count > previous {
                "a user connected"
            } else {
                "a user left"
            };
            vec![format!("porthole-agent: {what} ({count} now)")]
        }
        AgentEvent::Notice { message } => vec![format!("porthole-agent: {message}")],
        AgentEvent::Reconnecting { error, retry_in_ms } => vec![format!(
            "porthole-agent: {error}; reconnecting in {:.1}s",
            *retry_in_ms as f64 / 1000.0
        )],
        AgentEvent::Revoked { .. } => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use porthole_protocol::Secret;

    use super::*;

    #[test]
    fn visitors_read_as_arrivals_and_departures() {
        let up = event(
            &AgentEvent::Visitors {
                count: 2,
                previous: 1,
            },
            &[],
        );
        assert_eq!(up, ["porthole-agent: a user connected (2 now)"]);
        let down = event(
            &AgentEvent::Visitors {
                count: 0,
                previous: 1,
            },
            &[],
        );
        assert_eq!(down, ["porthole-agent: a user left (0 now)"]);
    }

    #[test]
    fn instructions_never_show_the_password() {
        let logins = [Credential {
            service: Service::Ssh,
            username: "vagrant".into(),
            password: Some(Secret::new("hunter2-secret")),
        }];
        let endpoints = [Endpoint {
            service: Service::Ssh,
            host: "relay.example.com".into(),
            port: 20417,
        }];
        let lines = instructions("s_1", &endpoints, SystemTime::UNIX_EPOCH, &logins).join("\n");
        assert!(
            lines.contains("ssh -p 20417 vagrant@relay.example.com"),
            "{lines}"
        );
        assert!(!lines.contains("hunter2"), "{lines}");
    }

    #[test]
    fn times_left_are_whole_seconds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let later = now + Duration::from_millis(90_500);
        assert_eq!(
            time_and_left(later, now),
            "1970-01-01T00:18:10Z (in 1m 30s)"
        );
        assert!(time_and_left(now - Duration::from_secs(1), now).ends_with("(passed)"));
    }
}
