//! Viewer tokens: who may watch which stream until when.
//!
//! A token is `base64url(version ‖ stream ‖ client ‖ expiry ‖ tag)`, where the tag is a
//! keyed BLAKE3 hash of the fields before it, truncated to 16 bytes. The control server
//! signs tokens and edges verify them with the same key; checking the tag takes the same
//! time whether or not it matches.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;

use crate::id::{ClientId, StreamId};

const VERSION: u8 = 1;
const BODY_LEN: usize = 1 + 4 + 8 + 8;
const TAG_LEN: usize = 16;
const TOKEN_LEN: usize = BODY_LEN + TAG_LEN;
/// Length of a token's text.
pub const TEXT_LEN: usize = (TOKEN_LEN * 4).div_ceil(3);

/// What a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// The stream it is good for.
    pub stream: StreamId,
    /// The viewer it was issued to.
    pub client: ClientId,
    /// When it stops being good, in seconds since the Unix epoch.
    pub expires: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a token at all.
    #[error("malformed token")]
    Malformed,
    /// Not signed by this network.
    #[error("token signature does not verify")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired at {0}")]
    Expired(u64),
    /// Good, but for another stream.
    #[error("token is for stream {0}")]
    WrongStream(StreamId),
}

/// A token's bytes and what it claims, its signature unchecked.
fn parse(token: &str) -> Result<([u8; TOKEN_LEN], Claims), TokenError> {
    if token.len() != TEXT_LEN {
        return Err(TokenError::Malformed);
    }
    let mut raw = [0u8; TOKEN_LEN];
    let n = URL_SAFE_NO_PAD
        .decode_slice(token, &mut raw)
        .map_err(|_| TokenError::Malformed)?;
    if n != TOKEN_LEN || raw[0] != VERSION {
        return Err(TokenError::Malformed);
    }
    let u32_at = |i: usize| u32::from_be_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
    let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
    let claims = Claims {
        stream: StreamId(u32_at(1)),
        client: ClientId(u64_at(5)),
        expires: u64_at(13),
    };
    Ok((raw, claims))
}

/// What `token` claims, **without checking its signature**: for its holder, which
/// cannot check it, to know when to renew it. Never a reason to trust it.
pub fn peek(token: &str) -> Result<Claims, TokenError> {
    parse(token).map(|(_, c)| c)
}

/// Signs and verifies tokens with one key.
#[derive(Clone)]
pub struct Signer {
    key: [u8; 32],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// A signer whose key is derived from `secret`.
    pub fn new(secret: &str) -> Signer {
        Signer {
            key: blake3::derive_key("braid 2026-11 viewer token v1", secret.as_bytes()),
        }
    }

    fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        let mut tag = [0; TAG_LEN];
        tag.copy_from_slice(&blake3::keyed_hash(&self.key, body).as_bytes()[..TAG_LEN]);
        tag
    }

    /// The token for `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let mut raw = [0u8; TOKEN_LEN];
        raw[0] = VERSION;
        raw[1..5].copy_from_slice(&claims.stream.0.to_be_bytes());
        raw[5..13].copy_from_slice(&claims.client.0.to_be_bytes());
        raw[13..21].copy_from_slice(&claims.expires.to_be_bytes());
        let tag = self.tag(&raw[..BODY_LEN]);
        raw[BODY_LEN..].copy_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The claims of `token` if it is signed with this key and not expired at `now_unix`.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, TokenError> {
        let (raw, claims) = parse(token)?;
        let expected = self.tag(&raw[..BODY_LEN]);
        if !bool::from(expected.ct_eq(&raw[BODY_LEN..])) {
            return Err(TokenError::BadSignature);
        }
        if now_unix >= claims.expires {
            return Err(TokenError::Expired(claims.expires));
        }
        Ok(claims)
    }

    /// Like [`Signer::verify`], and the token must be for `stream`.
    pub fn verify_for(
        &self,
        stream: StreamId,
        token: &str,
        now_unix: u64,
    ) -> Result<Claims, TokenError> {
        let claims = self.verify(token, now_unix)?;
        if claims.stream != stream {
            return Err(TokenError::WrongStream(claims.stream));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn claims() -> Claims {
        Claims {
            stream: StreamId(7),
            client: ClientId(0xfeed),
            expires: 1_800_000_000,
        }
    }

    #[test]
    fn signed_token_verifies() {
        let s = Signer::new("secret");
        let token = s.sign(&claims());
        assert_eq!(token.len(), TEXT_LEN);
        assert_eq!(s.verify(&token, 1_700_000_000), Ok(claims()));
        assert_eq!(
            s.verify_for(StreamId(7), &token, 1_700_000_000),
            Ok(claims())
        );
    }

    #[test]
    fn refusals() {
        let s = Signer::new("secret");
        let token = s.sign(&claims());
        let mut flipped = token.clone().into_bytes();
        flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        let cases: Vec<(&str, Result<Claims, TokenError>)> = vec![
            ("", Err(TokenError::Malformed)),
            ("not a token", Err(TokenError::Malformed)),
            (&token[1..], Err(TokenError::Malformed)),
            (&flipped, Err(TokenError::BadSignature)),
        ];
        for (t, expected) in cases {
            assert_eq!(s.verify(t, 0), expected, "{t:?}");
        }
        assert_eq!(
            Signer::new("other").verify(&token, 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            s.verify(&token, 1_800_000_000),
            Err(TokenError::Expired(1_800_000_000))
        );
        assert_eq!(
            s.verify_for(StreamId(8), &token, 0),
            Err(TokenError::WrongStream(StreamId(7)))
        );
    }

    proptest! {
        #[test]
        fn any_text_is_refused_or_verified_never_panics(text in ".{0,80}") {
            let _ = Signer::new("k").verify(&text, 0);
        }

        #[test]
        fn round_trip(stream in any::<u32>(), client in any::<u64>(), expires in 1u64..) {
            let s = Signer::new("k");
            let c = Claims { stream: StreamId(stream), client: ClientId(client), expires };
            prop_assert_eq!(s.verify(&s.sign(&c), expires - 1), Ok(c));
        }
    }
}
