//! Source addresses of unauthenticated peers: the key every per-source limit counts against
//! ([`source_key`]: IPv4 as is, IPv6 by /64) and a counter of concurrent permits per source
//! ([`PerIpLimit`]). A leaf: the edge modules and the session share it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The address limits count against: IPv4 as is, IPv6 by /64 (one host usually holds a
/// whole /64, so per-address limits would not slow it down).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// Pending handshakes per source IP.
#[derive(Debug)]
pub struct PerIpLimit {
    /// Handshakes in progress by address.
    counts: Mutex<HashMap<IpAddr, usize>>,
    /// Most allowed per address.
    max: usize,
}

/// One pending handshake of one address; released when dropped.
#[derive(Debug)]
pub struct PerIpPermit {
    /// The limit it counts against.
    owner: Arc<PerIpLimit>,
    /// The address.
    ip: IpAddr,
}

impl PerIpLimit {
    /// At most `max` pending handshakes per address.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::new(HashMap::new()),
            max,
        })
    }

    /// A permit for `ip`, or None when it already has `max` handshakes pending.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PerIpPermit> {
        let ip = source_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(PerIpPermit {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for PerIpPermit {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_count_by_slash_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap_or(IpAddr::from([0u8; 16]));
        let b: IpAddr = "2001:db8:1:2:ffff::9"
            .parse()
            .unwrap_or(IpAddr::from([0u8; 16]));
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(IpAddr::from([0u8; 16]));
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let v4: IpAddr = [192, 0, 2, 7].into();
        assert_eq!(source_key(v4), v4);
    }

    #[test]
    fn permits_are_counted_per_address_and_released() {
        let limit = PerIpLimit::new(2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = limit.try_acquire(a);
        let second = limit.try_acquire(a);
        assert!(first.is_some() && second.is_some());
        assert!(
            limit.try_acquire(a).is_none(),
            "third from the same address"
        );
        assert!(
            limit.try_acquire(b).is_some(),
            "another address is not affected"
        );
        drop(first);
        assert!(limit.try_acquire(a).is_some(), "released on drop");
        drop(second);
    }
}
