//! Role names compared robustly, and the role rule of the instructions endpoint.
//!
//! Both the configured lists (`denied_roles`, `allowed_roles`) and the roles of a token go
//! through [`normalize_role`] before they are compared, so look-alike spellings of a denied
//! role (`ＱＡ`, `qa\u{200b}`, `\u{feff}qa`, ` QA `) are that role. Look-alikes from another
//! script (Cyrillic `qа`) stay different strings: an allowlist is what stops those.

use unicode_normalization::UnicodeNormalization as _;

/// `role` in the form roles are compared in: Unicode NFKC, then default-ignorable code
/// points (invisible characters) dropped, then full Unicode case folding, then surrounding
/// whitespace trimmed.
pub fn normalize_role(role: &str) -> String {
    let visible: String = role.nfkc().filter(|c| !is_default_ignorable(*c)).collect();
    caseless::default_case_fold_str(&visible).trim().to_owned()
}

/// Whether `c` is a Default_Ignorable_Code_Point: the ranges of that property in Unicode's
/// `DerivedCoreProperties.txt` (Unicode 15.1), written out by hand.
pub fn is_default_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// What the role rule says about a token's roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleDecision<'a> {
    /// No role is denied, and the allowlist (if any) names one of them.
    Allowed,
    /// This role (as the token spells it) is denied; `""` when the token names no role.
    Denied(&'a str),
    /// An allowlist is set and names none of the roles.
    NotAllowed,
}

/// The configured role lists, normalised once.
#[derive(Clone, Debug, Default)]
pub struct RolePolicy {
    /// Denied roles, normalised (entries that normalise to nothing dropped).
    denied: Vec<String>,
    /// Allowed roles, normalised; `None`: no allowlist (every role not denied).
    allowed: Option<Vec<String>>,
}

impl RolePolicy {
    /// `denied` always loses; a non-empty `allowed` restricts access to the roles it names
    /// (if none of its entries survives normalisation, nobody is allowed: it fails closed).
    pub fn new(denied: &[String], allowed: &[String]) -> Self {
        let normalized = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|r| normalize_role(r))
                .filter(|r| !r.is_empty())
                .collect()
        };
        Self {
            denied: normalized(denied),
            allowed: (!allowed.is_empty()).then(|| normalized(allowed)),
        }
    }

    /// Decides for the roles a token names. A denied role wins over an allowed one, and a
    /// token naming no role (or only invisible ones) is denied: access never depends on a
    /// claim being absent.
    pub fn decide<'a>(&self, roles: impl IntoIterator<Item = &'a str>) -> RoleDecision<'a> {
        let roles: Vec<(&str, String)> = roles
            .into_iter()
            .map(|r| (r, normalize_role(r)))
            .filter(|(_, n)| !n.is_empty())
            .collect();
        if roles.is_empty() {
            return RoleDecision::Denied("");
        }
        if let Some((role, _)) = roles.iter().find(|(_, n)| self.denied.contains(n)) {
            return RoleDecision::Denied(role);
        }
        match &self.allowed {
            Some(allowed) if !roles.iter().any(|(_, n)| allowed.contains(n)) => {
                RoleDecision::NotAllowed
            }
            _ => RoleDecision::Allowed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn look_alike_spellings_normalise_to_the_role() {
        for spelling in [
            "qa",
            "QA",
            " QA ",
            "\tqa\n",
            "ＱＡ",
            "ｑａ",
            "qa\u{200b}",
            "q\u{200d}a",
            "\u{feff}qa",
            "\u{00ad}Q\u{034f}A\u{2060}",
            "qa\u{fe0f}",
            "q\u{e0041}a",
            "\u{202e}qa\u{202c}",
            "\u{3000}qa\u{3000}",
        ] {
            assert_eq!(normalize_role(spelling), "qa", "{spelling:?}");
        }
        assert_eq!(normalize_role("Tester"), "tester");
        assert_eq!(normalize_role("ＴＥＳＴＥＲ"), "tester");
    }

    #[test]
    fn case_folding_is_full_and_other_scripts_stay_apart() {
        // Full folding: ß is ss (to_lowercase keeps ß).
        assert_eq!(normalize_role("STRASSE"), normalize_role("straße"));
        // NFKC: the long s and the "ﬁ" ligature.
        assert_eq!(normalize_role("ﬁſh"), "fish");
        // Cyrillic а (U+0430) is another letter, not a spelling of Latin a.
        assert_ne!(normalize_role("q\u{0430}"), "qa");
        // Invisible-only roles are no role.
        assert_eq!(normalize_role("\u{200b}\u{feff} \u{3164}"), "");
    }

    #[test]
    fn the_table_matches_the_property_ranges() {
        for c in ['\u{00AD}', '\u{115F}', '\u{1160}', '\u{180E}', '\u{E0FFF}'] {
            assert!(is_default_ignorable(c), "{c:?}");
        }
        for c in ['a', ' ', '\u{00AC}', '\u{1161}', '\u{2070}', '\u{E1000}'] {
            assert!(!is_default_ignorable(c), "{c:?}");
        }
    }

    #[test]
    fn denied_wins_and_an_allowlist_restricts() {
        let open = RolePolicy::new(&strings(&["tester", "QA"]), &[]);
        assert_eq!(open.decide(["developer"]), RoleDecision::Allowed);
        assert_eq!(open.decide(["ＱＡ"]), RoleDecision::Denied("ＱＡ"));
        assert_eq!(
            open.decide(["developer", "\u{feff}Tester"]),
            RoleDecision::Denied("\u{feff}Tester")
        );
        assert_eq!(open.decide([]), RoleDecision::Denied(""));
        assert_eq!(open.decide(["\u{200b}", " "]), RoleDecision::Denied(""));

        let strict = RolePolicy::new(&strings(&["qa"]), &strings(&["Developer", "owner"]));
        assert_eq!(strict.decide(["DEVELOPER"]), RoleDecision::Allowed);
        assert_eq!(strict.decide(["ｏｗｎｅｒ "]), RoleDecision::Allowed);
        assert_eq!(strict.decide(["q\u{0430}"]), RoleDecision::NotAllowed);
        assert_eq!(strict.decide(["viewer"]), RoleDecision::NotAllowed);
        assert_eq!(
            strict.decide(["developer", "qa"]),
            RoleDecision::Denied("qa")
        );

        // An allowlist whose entries are all invisible allows nobody.
        let closed = RolePolicy::new(&[], &strings(&["\u{200b}"]));
        assert_eq!(closed.decide(["developer"]), RoleDecision::NotAllowed);
    }
}
