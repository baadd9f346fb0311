//! Address-validation cookies: a sender shows it receives at its address before it is
//! granted anything (DTLS's HelloVerify and QUIC's Retry, for Braid's own messages).
//!
//! A receiver answers a granting message (publish, subscribe, refresh, watch) that carries
//! no valid cookie with a cookie message, smaller than the message it answers, and does
//! nothing else; the sender echoes the cookie from then on. A cookie is a keyed hash of
//! the sender's address and the current epoch under a secret of the receiver's, so it is
//! worth nothing from another address (a recorded message replayed from elsewhere) or
//! after its epoch and the next ([`EPOCH`], so 30 to 60 s). A cookie of the previous
//! epoch is still taken, and a fresh one is sent with the answer, so a sender that keeps
//! talking never sees a refusal.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::wire::{COOKIE_LEN, Cookie};

/// How long one cookie epoch lasts; a cookie is good for its epoch and the next.
pub const EPOCH: Duration = Duration::from_secs(30);

/// Whom a cookie is for: an address, or a stream connection (a TCP viewer), which its
/// transport validated but which must not lend its cookie to another connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A datagram sender's address.
    Addr(SocketAddr),
    /// A connection, by its id.
    Conn(u64),
}

impl Subject {
    fn bytes(&self) -> [u8; 19] {
        let mut b = [0u8; 19];
        match self {
            Subject::Addr(a) => {
                b[0] = 1;
                match a.ip() {
                    std::net::IpAddr::V4(ip) => b[1..5].copy_from_slice(&ip.octets()),
                    std::net::IpAddr::V6(ip) => {
                        b[0] = 2;
                        b[1..17].copy_from_slice(&ip.octets());
                    }
                }
                b[17..19].copy_from_slice(&a.port().to_be_bytes());
            }
            Subject::Conn(id) => {
                b[0] = 3;
                b[1..9].copy_from_slice(&id.to_be_bytes());
            }
        }
        b
    }
}

/// What a cookie check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// A cookie of this epoch: go on.
    Fresh,
    /// A cookie of the previous epoch: go on, and send the sender a fresh one.
    Stale,
    /// None, or not one of ours for this sender now: answer with a cookie only.
    Bad,
}

impl Check {
    /// Whether the message may be acted on.
    pub fn ok(self) -> bool {
        self != Check::Bad
    }
}

/// A receiver's cookie secret and clock.
#[derive(Clone)]
pub struct Cookies {
    key: [u8; 32],
    origin: Option<Instant>,
}

impl std::fmt::Debug for Cookies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cookies(..)")
    }
}

impl Cookies {
    /// Cookies under `secret` (a daemon draws it at random at start; the simulator from
    /// its seed).
    pub fn new(secret: [u8; 32]) -> Cookies {
        Cookies {
            key: blake3::derive_key("braid 2026-11 address cookie v2", &secret),
            origin: None,
        }
    }

    /// Cookies under a secret drawn from the operating system's generator.
    pub fn random() -> Cookies {
        Cookies::new(rand::random())
    }

    fn epoch(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        (now.saturating_duration_since(origin).as_secs() / EPOCH.as_secs()) + 1
    }

    fn make(&self, epoch: u64, who: Subject) -> Cookie {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&epoch.to_be_bytes());
        h.update(&who.bytes());
        let mut c = [0; COOKIE_LEN];
        c.copy_from_slice(&h.finalize().as_bytes()[..COOKIE_LEN]);
        c
    }

    /// The cookie for `who` now.
    pub fn issue(&mut self, now: Instant, who: Subject) -> Cookie {
        let e = self.epoch(now);
        self.make(e, who)
    }

    /// Whether `cookie` is `who`'s now (in constant time).
    pub fn check(&mut self, now: Instant, who: Subject, cookie: &Cookie) -> Check {
        let e = self.epoch(now);
        if bool::from(self.make(e, who).ct_eq(cookie)) {
            Check::Fresh
        } else if bool::from(self.make(e - 1, who).ct_eq(cookie)) && e > 1 {
            Check::Stale
        } else {
            Check::Bad
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // Tests need one real instant to count from.
    fn a_cookie_is_good_for_its_address_and_two_epochs_only() {
        let mut c = Cookies::new([1; 32]);
        let t0 = Instant::now();
        let a = Subject::Addr("10.0.0.1:5000".parse().unwrap());
        let b = Subject::Addr("10.0.0.1:5001".parse().unwrap());
        let cookie = c.issue(t0, a);
        assert_eq!(c.check(t0, a, &cookie), Check::Fresh);
        assert_eq!(c.check(t0, b, &cookie), Check::Bad, "another port");
        assert_eq!(c.check(t0, Subject::Conn(1), &cookie), Check::Bad);
        assert_eq!(c.check(t0, a, &[0; COOKIE_LEN]), Check::Bad);
        assert_eq!(c.check(t0 + EPOCH, a, &cookie), Check::Stale);
        assert_eq!(c.check(t0 + EPOCH * 2, a, &cookie), Check::Bad, "too old");
        // Another receiver's secret gives other cookies.
        let mut other = Cookies::new([2; 32]);
        other.issue(t0, a);
        assert_eq!(other.check(t0, a, &cookie), Check::Bad);
    }
}
