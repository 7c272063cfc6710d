//! Limits on what unauthenticated peers can hold: pending agent handshakes per source IP
//! (the global cap is a semaphore in [`crate::agent_endpoint`]), so one address flooding the
//! endpoint with silent connections or stalled TLS handshakes cannot crowd out real agents.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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
        let ip = ip.to_canonical();
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
