//! What users need to log in, as reported by the agent: credentials per service and the
//! build machine's SSH host keys. Checked on arrival; kept in memory only and dropped at
//! revocation.

use porthole_protocol::limits::{MAX_CREDENTIAL_LEN, MAX_HOST_KEYS, MAX_HOST_KEY_LEN};
use porthole_protocol::username::validate_username;
use porthole_protocol::{Credential, Service};

/// Login details of a session (the `Debug` output shows no password: [`Credential`]
/// holds it as a redacted `Secret`).
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Credentials per service.
    pub credentials: Vec<Credential>,
    /// SSH host public keys as `TYPE BASE64` (comments dropped).
    pub host_keys: Vec<String>,
}

impl Access {
    /// Checks what an agent sent; the error names the bad item.
    pub fn from_hello(
        credentials: Vec<Credential>,
        host_keys: Vec<String>,
    ) -> Result<Self, String> {
        if host_keys.len() > MAX_HOST_KEYS {
            return Err(format!(
                "{} host keys sent; at most {MAX_HOST_KEYS}",
                host_keys.len()
            ));
        }
        let mut keys = Vec::with_capacity(host_keys.len());
        for (i, line) in host_keys.iter().enumerate() {
            keys.push(
                parse_host_key(line)
                    .ok_or_else(|| format!("host key {i} is not an OpenSSH public key line"))?,
            );
        }
        for c in &credentials {
            let bad = |v: &str| {
                v.is_empty() || v.len() > MAX_CREDENTIAL_LEN || v.chars().any(char::is_control)
            };
            // User names go into the command users paste into a shell: portable names only.
            if let Err(e) = validate_username(&c.username) {
                return Err(format!("{} user name refused: {e}", c.service));
            }
            if c.password.as_ref().is_some_and(|p| bad(p.expose())) {
                return Err(format!(
                    "{} password must be 1 to {MAX_CREDENTIAL_LEN} printable characters",
                    c.service
                ));
            }
        }
        Ok(Self {
            credentials,
            host_keys: keys,
        })
    }

    /// The credential of `service`, if the agent sent one.
    pub fn credential(&self, service: Service) -> Option<&Credential> {
        self.credentials.iter().find(|c| c.service == service)
    }

    /// `known_hosts` lines for `host:port`, one per host key, newline-separated.
    pub fn known_hosts(&self, host: &str, port: u16) -> Option<String> {
        if self.host_keys.is_empty() {
            return None;
        }
        let name = if port == 22 {
            host.to_owned()
        } else {
            format!("[{host}]:{port}")
        };
        Some(
            self.host_keys
                .iter()
                .map(|k| format!("{name} {k}"))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }
}

/// `TYPE BASE64 [COMMENT]` → `TYPE BASE64`, or None if it is not that shape.
fn parse_host_key(line: &str) -> Option<String> {
    if line.len() > MAX_HOST_KEY_LEN {
        return None;
    }
    let mut parts = line.split_whitespace();
    let kind = parts.next()?;
    let blob = parts.next()?;
    let kind_ok = !kind.is_empty()
        && kind
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-@.".contains(c));
    let blob_ok = blob.len() >= 16
        && blob
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c));
    (kind_ok && blob_ok).then(|| format!("{kind} {blob}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use porthole_protocol::Secret;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ root@vm";

    #[test]
    fn known_hosts_lines_use_the_bracketed_form_and_drop_comments() {
        let a = Access::from_hello(vec![], vec![KEY.into()]).unwrap_or_default();
        let line = a
            .known_hosts("relay.example.com", 20417)
            .unwrap_or_default();
        assert_eq!(
            line,
            format!("[relay.example.com]:20417 {}", &KEY[..KEY.len() - 8])
        );
        assert_eq!(Access::default().known_hosts("h", 1), None);
    }

    #[test]
    fn bad_items_are_refused_with_their_name() {
        let err = Access::from_hello(vec![], vec!["not a key; rm -rf".into()])
            .err()
            .unwrap_or_default();
        assert!(err.contains("host key 0"), "{err}");
        let cred = Credential {
            service: Service::Ssh,
            username: "a\nb".into(),
            password: Some(Secret::new("p")),
        };
        let err = Access::from_hello(vec![cred], vec![])
            .err()
            .unwrap_or_default();
        assert!(err.contains("ssh user name"), "{err}");
        for name in [
            "$(touch /tmp/x)dev",
            "-oProxyCommand=nc",
            "a b",
            "`id`",
            "ｑａ",
        ] {
            let cred = Credential {
                service: Service::Vnc,
                username: name.into(),
                password: None,
            };
            let err = Access::from_hello(vec![cred], vec![])
                .err()
                .unwrap_or_default();
            assert!(
                err.contains("vnc user name refused") && err.contains("POSIX-portable"),
                "{name}: {err}"
            );
        }
    }
}
