//! The rule for user names that end up in instructions: the `ssh` command users paste into
//! a shell and the VNC login they type. Only POSIX-portable names pass (the character set of
//! POSIX "portable filename" user names, not starting with `-`), so a name can never carry
//! shell syntax (`$(...)`, backticks, `;`, quotes, spaces) or an option (`-oProxyCommand=`).
//! Checked where names enter: the agent's flags and the relay's `hello` handling.

/// Longest user name accepted, in bytes (the traditional `utmp` limit).
pub const MAX_USERNAME_LEN: usize = 32;

/// The rule, for error messages.
pub const USERNAME_RULE: &str =
    "POSIX-portable user names only: letters, digits, `.`, `_` and `-`, not starting with `-`, at most 32 bytes";

/// Why a user name was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    /// Empty.
    #[error("the user name is empty ({USERNAME_RULE})")]
    Empty,
    /// Longer than [`MAX_USERNAME_LEN`].
    #[error("the user name is {0} bytes long ({USERNAME_RULE})")]
    TooLong(usize),
    /// Starts with `-`.
    #[error("the user name starts with `-` ({USERNAME_RULE})")]
    LeadingDash,
    /// Holds a character outside the portable set.
    #[error("the user name holds a character outside [A-Za-z0-9._-] ({USERNAME_RULE})")]
    BadCharacter,
}

/// Checks `name` against `[A-Za-z0-9._][A-Za-z0-9._-]*`, at most [`MAX_USERNAME_LEN`] bytes.
pub fn validate_username(name: &str) -> Result<(), UsernameError> {
    if name.is_empty() {
        return Err(UsernameError::Empty);
    }
    if name.len() > MAX_USERNAME_LEN {
        return Err(UsernameError::TooLong(name.len()));
    }
    if name.starts_with('-') {
        return Err(UsernameError::LeadingDash);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(UsernameError::BadCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_names_pass() {
        for ok in [
            "vagrant",
            "runner",
            "a",
            "_ci",
            ".x",
            "build-user_1.2",
            &"u".repeat(32),
        ] {
            assert_eq!(validate_username(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn shell_syntax_options_and_unicode_are_refused() {
        let cases = [
            ("", UsernameError::Empty),
            ("$(touch /tmp/x)dev", UsernameError::BadCharacter),
            ("`id`", UsernameError::BadCharacter),
            ("a;b", UsernameError::BadCharacter),
            ("a b", UsernameError::BadCharacter),
            ("a'b", UsernameError::BadCharacter),
            ("a\"b", UsernameError::BadCharacter),
            ("-oProxyCommand=x", UsernameError::LeadingDash),
            ("-x", UsernameError::LeadingDash),
            ("dév", UsernameError::BadCharacter),
            ("ｖａｇｒａｎｔ", UsernameError::TooLong(21)),
            ("a\nb", UsernameError::BadCharacter),
            ("a@b", UsernameError::BadCharacter),
        ];
        for (name, want) in cases {
            let got = validate_username(name);
            assert!(got.is_err(), "{name:?} passed");
            if !matches!(want, UsernameError::TooLong(_)) {
                assert_eq!(got, Err(want), "{name:?}");
            }
        }
        assert_eq!(
            validate_username(&"u".repeat(33)),
            Err(UsernameError::TooLong(33))
        );
        let msg = UsernameError::BadCharacter.to_string();
        assert!(msg.contains("POSIX-portable"), "{msg}");
    }
}
