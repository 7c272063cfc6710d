//! Text that came from a peer (an agent's `hello`, a visitor, an HTTP path) on its way into
//! a log line: [`Untrusted`] prints it escaped (no newline, control character or ANSI escape
//! survives, so it cannot forge a line or repaint a terminal) and truncated (a peer cannot
//! make one line large). [`valid_session_id`] checks an id from unauthenticated input
//! against the format the relay issues, before it is looked up or logged.

use std::fmt;

/// Characters of peer text shown in a log line; the rest is summarised as a count.
pub const MAX_LOGGED_CHARS: usize = 64;

/// Characters shown of a message that embeds peer text (a refusal's explanation).
pub const MAX_LOGGED_MESSAGE_CHARS: usize = 512;

/// Length of a session id: `s_` and 20 lowercase hex digits.
const SESSION_ID_LEN: usize = 22;

/// Peer text for a log line: escaped like a Rust string literal's contents, at most
/// [`MAX_LOGGED_CHARS`] characters of it, then `…(+N chars)`.
#[derive(Clone, Copy, Debug)]
pub struct Untrusted<'a>(pub &'a str);

/// A message that embeds peer text (e.g. a refusal quoting a field): escaped like
/// [`Untrusted`], at most [`MAX_LOGGED_MESSAGE_CHARS`] characters.
#[derive(Clone, Copy, Debug)]
pub struct UntrustedMessage<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        escaped(f, self.0, MAX_LOGGED_CHARS)
    }
}

impl fmt::Display for UntrustedMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        escaped(f, self.0, MAX_LOGGED_MESSAGE_CHARS)
    }
}

/// Writes `text` escaped, at most `limit` characters of it, then `…(+N chars)`.
fn escaped(f: &mut fmt::Formatter<'_>, text: &str, limit: usize) -> fmt::Result {
    let mut chars = text.chars();
    for c in chars.by_ref().take(limit) {
        // escape_debug leaves printable non-ASCII alone but escapes control characters
        // (newline, ESC, NUL, ...) and quotes.
        write!(f, "{}", c.escape_debug())?;
    }
    let rest = chars.count();
    if rest > 0 {
        write!(f, "…(+{rest} chars)")?;
    }
    Ok(())
}

/// Whether `id` has the shape of a session id this relay issues (`s_` + 20 lowercase hex).
pub fn valid_session_id(id: &str) -> bool {
    id.len() == SESSION_ID_LEN
        && id.starts_with("s_")
        && id
            .bytes()
            .skip(2)
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_truncated() {
        let forged = "v1\n2026-01-01T00:00:00Z  INFO session revoked\x1b[2J";
        let shown = Untrusted(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\x1b'), "{shown}");
        assert!(
            shown.contains("\\n") && shown.contains("\\u{1b}"),
            "{shown}"
        );
        let long = "x".repeat(60_000);
        let shown = Untrusted(&long).to_string();
        assert!(shown.len() < 100, "{}", shown.len());
        assert!(shown.ends_with("(+59936 chars)"), "{shown}");
        assert_eq!(
            Untrusted("porthole-agent 0.1.0").to_string(),
            "porthole-agent 0.1.0"
        );
    }

    #[test]
    fn only_issued_shapes_are_session_ids() {
        assert!(valid_session_id("s_0123456789abcdef0123"));
        for bad in [
            "",
            "s_",
            "s_0123456789abcdef012",
            "s_0123456789abcdef01234",
            "s_0123456789ABCDEF0123",
            "x_0123456789abcdef0123",
            "s_0123456789abcdef012\n",
            "s_0123456789abcdef01é",
        ] {
            assert!(!valid_session_id(bad), "{bad:?}");
        }
        let long = format!("s_{}", "a".repeat(60_000));
        assert!(!valid_session_id(&long));
    }
}
