//! Peer addresses with their transport: `quic://192.0.2.1:9443`, `udp://192.0.2.1:9000`,
//! or a bare `192.0.2.1:9000`, which means UDP.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How a peer is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Braid datagrams straight over UDP.
    Udp,
    /// QUIC: media as datagrams, control on a stream, TLS.
    Quic,
}

/// A peer's address and the transport to reach it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// The transport.
    pub transport: Transport,
    /// The address (for QUIC, the peer's QUIC endpoint).
    pub addr: SocketAddr,
}

impl PeerAddr {
    /// A UDP peer.
    pub fn udp(addr: SocketAddr) -> PeerAddr {
        PeerAddr {
            transport: Transport::Udp,
            addr,
        }
    }

    /// A QUIC peer.
    pub fn quic(addr: SocketAddr) -> PeerAddr {
        PeerAddr {
            transport: Transport::Quic,
            addr,
        }
    }

    /// Whether it is reached over QUIC.
    pub fn is_quic(&self) -> bool {
        self.transport == Transport::Quic
    }
}

impl PartialEq<SocketAddr> for PeerAddr {
    fn eq(&self, other: &SocketAddr) -> bool {
        self.addr == *other
    }
}

impl FromStr for PeerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (transport, rest) = if let Some(r) = s.strip_prefix("quic://") {
            (Transport::Quic, r)
        } else if let Some(r) = s.strip_prefix("udp://") {
            (Transport::Udp, r)
        } else if s.contains("://") {
            return Err(format!(
                "peer address {s:?}: the transport must be quic:// or udp://"
            ));
        } else {
            (Transport::Udp, s)
        };
        let addr = rest
            .parse()
            .map_err(|e| format!("peer address {s:?}: {e} (want IP:PORT)"))?;
        Ok(PeerAddr { transport, addr })
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.transport {
            Transport::Udp => write!(f, "udp://{}", self.addr),
            Transport::Quic => write!(f, "quic://{}", self.addr),
        }
    }
}

impl Serialize for PeerAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PeerAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_each_form() {
        let q: PeerAddr = "quic://127.0.0.1:9443".parse().unwrap();
        assert!(q.is_quic());
        assert_eq!(q.to_string(), "quic://127.0.0.1:9443");
        let bare: PeerAddr = "127.0.0.1:9000".parse().unwrap();
        assert_eq!(bare, PeerAddr::udp("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(bare.to_string().parse::<PeerAddr>().unwrap(), bare);
        let v6: PeerAddr = "quic://[::1]:9".parse().unwrap();
        assert_eq!(v6.addr.port(), 9);
    }

    #[test]
    fn refuses_unknown_transports_and_bad_addresses() {
        assert!(
            "tcp://1.2.3.4:5"
                .parse::<PeerAddr>()
                .unwrap_err()
                .contains("quic://")
        );
        assert!("quic://nohost".parse::<PeerAddr>().is_err());
        assert!("".parse::<PeerAddr>().is_err());
    }
}
