//! Node requests to a control server (reports, the set reflectors' list), signed with the
//! network key: only nodes hold it, so only nodes register, and a request recorded and
//! sent again is good for [`WINDOW`] at most.
//!
//! The header [`HEADER`] carries `UNIX_MS.TAG`: the sender's wall clock in milliseconds
//! and the first 16 bytes, in hex, of a keyed BLAKE3 hash of the method, the path, that
//! time and the body, under a key derived from the network key. A control server takes
//! the request when the tag verifies and the time is within [`WINDOW`] of its own clock.

use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::wire::Key;

/// The HTTP header that carries the signature.
pub const HEADER: &str = "x-braid-node";
/// How far a request's time may be from the server's, either way.
pub const WINDOW: Duration = Duration::from_secs(30);

/// Why a node request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No signature at all.
    #[error("not signed: node requests carry the {HEADER} header, made with the network key")]
    Missing,
    /// Not of the form `UNIX_MS.TAG`.
    #[error("malformed {HEADER} header")]
    Malformed,
    /// Signed at a time too far from the server's clock (a replay, or a clock off).
    #[error("signed {0} ms away from this server's clock (at most 30 s either way)")]
    Stale(u64),
    /// The tag does not verify: not signed with this network's key.
    #[error("signature does not verify: another network key")]
    BadTag,
}

/// Signs and verifies node requests with one network key.
#[derive(Clone)]
pub struct NodeAuth {
    key: [u8; 32],
}

impl std::fmt::Debug for NodeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeAuth(..)")
    }
}

impl NodeAuth {
    /// Node requests of the network whose key is `key`.
    pub fn new(key: &Key) -> NodeAuth {
        NodeAuth {
            key: blake3::derive_key("braid 2026-11 control request v2", key.bytes()),
        }
    }

    fn tag(&self, method: &str, path: &str, unix_ms: u64, body: &[u8]) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        for part in [method.as_bytes(), path.as_bytes(), &unix_ms.to_be_bytes()] {
            h.update(&(part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(body);
        let mut t = [0; 16];
        t.copy_from_slice(&h.finalize().as_bytes()[..16]);
        t
    }

    /// The header value for a request (`path` with its query, if any) sent at `unix_ms`.
    pub fn sign(&self, method: &str, path: &str, unix_ms: u64, body: &[u8]) -> String {
        let mut s = format!("{unix_ms}.");
        for b in self.tag(method, path, unix_ms, body) {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Whether `header` signs this request, at the server's `now_ms`.
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        header: Option<&str>,
        body: &[u8],
        now_ms: u64,
    ) -> Result<(), AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let (ms, hex) = header.split_once('.').ok_or(AuthError::Malformed)?;
        let unix_ms: u64 = ms.parse().map_err(|_| AuthError::Malformed)?;
        if hex.len() != 32 || !hex.is_ascii() {
            return Err(AuthError::Malformed);
        }
        let mut tag = [0u8; 16];
        for (i, t) in tag.iter_mut().enumerate() {
            *t =
                u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| AuthError::Malformed)?;
        }
        let expected = self.tag(method, path, unix_ms, body);
        if !bool::from(expected.ct_eq(&tag)) {
            return Err(AuthError::BadTag);
        }
        let off = now_ms.abs_diff(unix_ms);
        if off > WINDOW.as_millis() as u64 {
            return Err(AuthError::Stale(off));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_signed_request_verifies_once_and_only_as_signed() {
        let a = NodeAuth::new(&Key::derive("net"));
        let now = 1_800_000_000_000;
        let h = a.sign("POST", "/v1/report", now, b"{}");
        assert_eq!(
            a.verify("POST", "/v1/report", Some(&h), b"{}", now + 1000),
            Ok(())
        );
        let bad = |m: &str, p: &str, b: &[u8], t: u64| a.verify(m, p, Some(&h), b, t);
        assert_eq!(
            bad("POST", "/v1/report", b"{ }", now),
            Err(AuthError::BadTag)
        );
        assert_eq!(bad("GET", "/v1/report", b"{}", now), Err(AuthError::BadTag));
        assert_eq!(
            bad("POST", "/v1/reflectors", b"{}", now),
            Err(AuthError::BadTag)
        );
        assert!(matches!(
            bad("POST", "/v1/report", b"{}", now + 31_000),
            Err(AuthError::Stale(_))
        ));
        let other = NodeAuth::new(&Key::derive("another net"));
        assert_eq!(
            other.verify("POST", "/v1/report", Some(&h), b"{}", now),
            Err(AuthError::BadTag)
        );
        assert_eq!(
            a.verify("POST", "/v1/report", None, b"{}", now),
            Err(AuthError::Missing)
        );
    }

    proptest! {
        /// Any header value is an error or a pass, never a panic.
        #[test]
        fn any_header_is_checked_without_panic(h in ".{0,80}", body in prop::collection::vec(any::<u8>(), 0..64)) {
            let a = NodeAuth::new(&Key::derive("net"));
            let _ = a.verify("POST", "/v1/report", Some(&h), &body, 0);
        }
    }
}
