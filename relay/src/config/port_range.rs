//! An inclusive range of TCP ports, written `LO-HI`.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An inclusive range of TCP ports, written `LO-HI`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortRange {
    /// Number of ports in the range.
    pub fn len(&self) -> usize {
        usize::from(self.hi.saturating_sub(self.lo)) + 1
    }

    /// Always false: a valid range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("port range `{s}`: expected LO-HI, e.g. 20000-20999");
        let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
        let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
        if lo == 0 || lo > hi {
            return Err(format!(
                "port range `{s}`: LO must be at least 1 and not above HI"
            ));
        }
        Ok(PortRange { lo, hi })
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        r.to_string()
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_refuse_nonsense() {
        assert_eq!(
            "20000-20999".parse::<PortRange>().map(|r| r.len()),
            Ok(1000)
        );
        assert!("20999-20000".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("abc".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
    }
}
