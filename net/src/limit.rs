//! Connection slots: at most so many connections open in all and from one IP address,
//! each holding its slot until dropped. Daemons that take TCP connections from the
//! public (an edge's TCP viewers, the control server's HTTP) keep to them, so that idle
//! connections from one address cannot hold every descriptor.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// The slots of one listener.
#[derive(Debug, Clone)]
pub struct Slots {
    counts: Arc<Mutex<Counts>>,
    max: usize,
    max_per_ip: usize,
}

/// A connection's slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Slots {
    /// At most `max` connections, `max_per_ip` from one address.
    pub fn new(max: usize, max_per_ip: usize) -> Slots {
        Slots {
            counts: Arc::default(),
            max,
            max_per_ip,
        }
    }

    /// A slot for a connection from `ip`, or why not (`total`, `per_ip`: the label of
    /// the refusal's counter).
    pub fn take(&self, ip: IpAddr) -> Result<Slot, &'static str> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.max {
            return Err("total");
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err("per_ip");
        }
        *n += 1;
        c.total += 1;
        Ok(Slot {
            counts: self.counts.clone(),
            ip,
        })
    }

    /// Connections open.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_in_all_and_per_address_and_given_back() {
        let s = Slots::new(3, 2);
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let a1 = s.take(a).unwrap();
        let _a2 = s.take(a).unwrap();
        assert_eq!(s.take(a).unwrap_err(), "per_ip");
        let _b1 = s.take(b).unwrap();
        assert_eq!(s.take(b).unwrap_err(), "total");
        drop(a1);
        assert_eq!(s.open(), 2);
        assert!(s.take(a).is_ok());
    }
}
