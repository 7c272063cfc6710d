//! The `Authorization: Bearer <token>` header (RFC 6750), parsed once for both kinds of
//! token: the admin token on the admin routes, user tokens on the instructions route.

use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;

/// Why a request carries no bearer token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoBearer {
    /// No `Authorization` header.
    Missing,
    /// The header is not `Bearer <token>` (another scheme, no token, or not visible ASCII).
    Malformed,
}

/// The bearer token of `headers`, trimmed. The scheme name is case-insensitive (RFC 7235).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, NoBearer> {
    let value = headers.get(AUTHORIZATION).ok_or(NoBearer::Missing)?;
    let value = value.to_str().map_err(|_| NoBearer::Malformed)?;
    value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or(NoBearer::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(value: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(value) {
            h.insert(AUTHORIZATION, v);
        }
        h
    }

    #[test]
    fn bearer_tokens_are_found_and_everything_else_is_named() {
        assert_eq!(bearer_token(&with(b"Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(&with(b"bEaReR  abc ")), Ok("abc"));
        assert_eq!(bearer_token(&HeaderMap::new()), Err(NoBearer::Missing));
        assert_eq!(bearer_token(&with(b"Basic abc")), Err(NoBearer::Malformed));
        assert_eq!(bearer_token(&with(b"Bearer")), Err(NoBearer::Malformed));
        assert_eq!(bearer_token(&with(b"Bearer  ")), Err(NoBearer::Malformed));
        assert_eq!(
            bearer_token(&with(b"Bearer \xff")),
            Err(NoBearer::Malformed)
        );
    }
}
