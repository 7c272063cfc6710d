//! User tokens: short-lived HS256 JWTs the CI backend mints for its users with a secret it
//! shares with the relay. Only the instructions endpoint takes them.
//!
//! Verification uses `jsonwebtoken` with HS256 as the only algorithm (so `none` and every
//! other algorithm are refused), requires `exp` and `sub`, honours `nbf`, and allows a small
//! clock leeway.
//!
//! Roles are compared after normalisation ([`roles`]: NFKC, invisible characters dropped,
//! case folding, trimming), so a look-alike spelling of a denied role is that role.

mod roles;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::RelayError;
pub use roles::{is_default_ignorable, normalize_role, RoleDecision, RolePolicy};

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// Characters kept of a verification error (it may quote peer text).
pub const MAX_ERROR_CHARS: usize = 200;

/// Shortest secret accepted: HS256 wants a key at least as long as its output.
pub const MIN_SECRET_LEN: usize = 32;

/// The `role` claim: one role or a list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Roles {
    /// `"role": "developer"`.
    One(String),
    /// `"role": ["developer", "tester"]`.
    Many(Vec<String>),
}

impl Roles {
    /// Every role named.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let slice: &[String] = match self {
            Roles::One(r) => std::slice::from_ref(r),
            Roles::Many(v) => v,
        };
        slice.iter().map(String::as_str)
    }

    /// The roles as one string, for the audit log.
    pub fn joined(&self) -> String {
        self.iter().collect::<Vec<_>>().join(",")
    }
}

/// The claims of a user token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserClaims {
    /// User id in the CI product.
    pub sub: String,
    /// The app the user is acting on.
    pub app_id: String,
    /// The user's role(s) on that app.
    pub role: Roles,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Not before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// Verifies user tokens and decides roles.
pub struct UserTokens {
    /// HMAC key.
    key: DecodingKey,
    /// Algorithm, claims and leeway rules.
    validation: Validation,
    /// Roles refused (normalised), no allowlist.
    denied_roles: RolePolicy,
}

impl std::fmt::Debug for UserTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserTokens")
            .field("denied_roles", &self.denied_roles)
            .finish_non_exhaustive()
    }
}

fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = LEEWAY_SECS;
    v.validate_nbf = true;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "sub"]);
    v
}

impl UserTokens {
    /// A verifier for tokens signed with `secret`, refusing `denied_roles`.
    pub fn new(secret: &[u8], denied_roles: &[String]) -> Self {
        Self {
            key: DecodingKey::from_secret(secret),
            validation: validation(),
            denied_roles: RolePolicy::new(denied_roles, &[]),
        }
    }

    /// Checks signature, algorithm, expiry and claims. The error says what was wrong, for a
    /// 401 answer and the audit log; it may quote the (unauthenticated) token header, so it
    /// is cut to [`MAX_ERROR_CHARS`].
    pub fn verify(&self, token: &str) -> Result<UserClaims, String> {
        jsonwebtoken::decode::<UserClaims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| {
                let mut message = format!("invalid user token: {e}");
                if let Some((cut, _)) = message.char_indices().nth(MAX_ERROR_CHARS) {
                    message.truncate(cut);
                    message.push('…');
                }
                message
            })
    }

    /// The first of the claims' roles that is denied, if any (compared after
    /// [`normalize_role`]). A token naming no role at all is denied too (`Some("")`): access
    /// must never depend on a claim being absent. The instructions endpoint applies a
    /// [`RolePolicy`] with the allowlist as well.
    pub fn denied_role<'a>(&self, claims: &'a UserClaims) -> Option<&'a str> {
        match self.denied_roles.decide(claims.role.iter()) {
            RoleDecision::Denied(role) => Some(role),
            RoleDecision::Allowed | RoleDecision::NotAllowed => None,
        }
    }
}

/// Signs a user token (for `porthole-relay mint-user-token` and tests).
pub fn mint(
    secret: &[u8],
    sub: &str,
    app_id: &str,
    role: Roles,
    ttl: Duration,
) -> Result<String, String> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = UserClaims {
        sub: sub.to_owned(),
        app_id: app_id.to_owned(),
        role,
        exp: now + ttl.as_secs(),
        nbf: None,
        iat: Some(now),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| format!("cannot sign the token: {e}"))
}

/// Reads the shared secret (the file's contents, surrounding whitespace removed, as bytes),
/// creating a 256-bit random one (64 hex digits, mode 0600) if the file does not exist.
/// Returns the secret and whether it was created.
pub fn load_or_create_secret(path: &Path) -> Result<(Vec<u8>, bool), RelayError> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let secret = text.trim().as_bytes().to_vec();
            if secret.len() < MIN_SECRET_LEN {
                return Err(RelayError::Config(format!(
                    "{}: the user token secret must be at least {MIN_SECRET_LEN} bytes",
                    path.display()
                )));
            }
            crate::ops::bootstrap::warn_if_loose(path, "user token secret");
            Ok((secret, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|source| RelayError::File {
                    path: dir.to_owned(),
                    source,
                })?;
            }
            let secret = porthole_protocol::Secret::generate("");
            crate::ops::bootstrap::write_private(
                path,
                format!("{}\n", secret.expose()).as_bytes(),
            )?;
            Ok((secret.expose().as_bytes().to_vec(), true))
        }
        Err(source) => Err(RelayError::File {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn tokens() -> UserTokens {
        UserTokens::new(SECRET, &["tester".into(), "QA".into()])
    }

    #[test]
    fn minted_tokens_verify_and_roles_are_checked_case_insensitively() {
        let t = mint(
            SECRET,
            "u1",
            "app",
            Roles::One("Developer".into()),
            Duration::from_secs(60),
        );
        let claims = tokens()
            .verify(&t.unwrap_or_default())
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(claims.sub, "u1");
        assert_eq!(tokens().denied_role(&claims), None);
        let qa = UserClaims {
            role: Roles::One("qa".into()),
            ..claims.clone()
        };
        assert_eq!(tokens().denied_role(&qa), Some("qa"));
        let mixed = UserClaims {
            role: Roles::Many(vec!["developer".into(), "Tester".into()]),
            ..claims
        };
        assert_eq!(tokens().denied_role(&mixed), Some("Tester"));
    }

    #[test]
    fn other_keys_and_alg_none_are_refused() {
        let t = mint(
            b"another-secret-another-secret-xx",
            "u",
            "a",
            Roles::One("dev".into()),
            Duration::from_secs(60),
        );
        assert!(tokens().verify(&t.unwrap_or_default()).is_err());
        // {"alg":"none","typ":"JWT"} . {"sub":"u","app_id":"a","role":"dev","exp":9999999999} .
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiYXBwX2lkIjoiYSIsInJvbGUiOiJkZXYiLCJleHAiOjk5OTk5OTk5OTl9.";
        assert!(tokens().verify(none).is_err());
    }

    #[test]
    fn errors_quoting_a_huge_header_are_cut() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let header = format!(r#"{{"alg":"{}","typ":"JWT"}}"#, "A".repeat(50_000));
        let token = format!("{}.{}.sig", b64(&header), b64(r#"{"sub":"u"}"#));
        let err = tokens().verify(&token).err().unwrap_or_default();
        assert!(err.starts_with("invalid user token"), "{err}");
        assert!(err.chars().count() <= MAX_ERROR_CHARS + 1, "{}", err.len());
    }

    #[test]
    fn padded_roles_and_tokens_without_roles_are_denied() {
        let base = UserClaims {
            sub: "u".into(),
            app_id: "a".into(),
            role: Roles::One(" QA ".into()),
            exp: 0,
            nbf: None,
            iat: None,
        };
        assert!(
            tokens().denied_role(&base).is_some(),
            "surrounding spaces do not hide a role"
        );
        for spelling in ["ＱＡ", "qa\u{200b}", "\u{feff}qa"] {
            let look_alike = UserClaims {
                role: Roles::Many(vec!["developer".into(), spelling.into()]),
                ..base.clone()
            };
            assert_eq!(tokens().denied_role(&look_alike), Some(spelling));
        }
        let none = UserClaims {
            role: Roles::Many(vec![]),
            ..base.clone()
        };
        assert!(
            tokens().denied_role(&none).is_some(),
            "an empty role list is denied"
        );
        let blank = UserClaims {
            role: Roles::One("  ".into()),
            ..base.clone()
        };
        assert!(
            tokens().denied_role(&blank).is_some(),
            "a blank role is denied"
        );
        let dev = UserClaims {
            role: Roles::One("developer".into()),
            ..base
        };
        assert_eq!(tokens().denied_role(&dev), None);
    }
}
