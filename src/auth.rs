//! Authentication (API.md sections 7 and 10): checking credentials and deciding what a
//! principal may do.
//!
//! Owns: HS256 JWT verification for WebSocket and SSE (`auth.jwt_secret`), API-key checks for
//! the publish, registry and admin HTTP endpoints (`auth.api_keys`), parsing of
//! `Authorization: Bearer`, and the subscribe and publish scopes a token grants (`channels` and
//! `publish` claims, matched with the relay's one glob dialect).
//!
//! Must never: do I/O (the caller passes the clock in as `now_s`, so nothing here reads the
//! system time), log or echo a secret, token or key (no error message quotes one, and `Auth`'s
//! `Debug` shows neither secret nor keys), panic on input (nothing here calls unwrap or expect,
//! or indexes by position), or compare API keys in a time that depends on where they differ.
//!
//! Decisions the contract leaves open, made here:
//! - `exp` is the first second the token is invalid: it is accepted only while `now_s < exp`
//!   (RFC 7519 4.1.4), with no leeway. A fractional `exp` is rounded down.
//! - A token's `nbf`, when present, is enforced against `now_s` the same way (valid from `nbf`
//!   on). `aud` and `iss` are not checked: the contract defines no audience or issuer, and a
//!   token that carries them is still accepted.
//! - `sub` must be a non-empty string. A claim that is present but `null` or of the wrong type
//!   fails with `BadClaim` and never falls back to the meaning of the absent claim
//!   (`"channels": null` does not mean "every channel"). One exception to the error kind, not
//!   to the refusal: an array or object in `sub`, `exp` or `nbf` (or an `iss`/`aud` array
//!   holding non-strings) trips jsonwebtoken's own claim parsing first and is `Malformed`.
//! - A bearer header wins over the `token` query value even when the header's token is invalid:
//!   a request never gets a second try with another credential.
//! - `api_keys = []` requires a key that nobody has, so every keyed request fails (fails closed).
//!   Empty keys and an empty JWT secret can't authenticate anything (config rejects both anyway).

use std::fmt;
use std::hint::black_box;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::glob::GlobSet;

/// The only algorithm accepted, as it appears in a token's header.
const ACCEPTED_ALG: &str = "HS256";

/// The relay's authentication settings, built once from config and shared read-only (`Arc`)
/// across shard threads.
pub struct Auth {
    jwt: Option<JwtVerifier>,
    /// Configured API keys; `None` when `auth.api_keys` is unset.
    api_keys: Option<Vec<Vec<u8>>>,
}

struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    /// An empty HMAC secret would let anyone sign tokens, so such a verifier refuses them all.
    usable: bool,
}

impl fmt::Debug for Auth {
    /// Shows which checks are on, never the secret or the keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("jwt_required", &self.jwt_required())
            .field("api_keys", &self.api_keys.as_ref().map(Vec::len))
            .finish()
    }
}

impl Auth {
    /// Builds the settings from `auth.jwt_secret` and `auth.api_keys`.
    pub fn new(jwt_secret: Option<&str>, api_keys: Option<&[String]>) -> Auth {
        let jwt = jwt_secret.map(|secret| {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.algorithms = vec![Algorithm::HS256];
            validation.leeway = 0;
            // The library checks `exp` against the system clock; `exp` (and `nbf`) are checked
            // against the caller's `now_s` in `claims_to_principal` instead.
            validation.validate_exp = false;
            validation.validate_nbf = false;
            // The library's presence check reports a claim of the wrong type (`"sub": 42`) as
            // missing and runs before the claims reach us, so presence and type of `sub` and
            // `exp` are checked here, with `MissingClaim` and `BadClaim` kept apart.
            validation.required_spec_claims.clear();
            // No audience is configured; with this on, any token carrying `aud` would fail.
            validation.validate_aud = false;
            JwtVerifier {
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation,
                usable: !secret.is_empty(),
            }
        });
        let api_keys = api_keys.map(|keys| {
            keys.iter()
                .filter(|k| !k.is_empty())
                .map(|k| k.as_bytes().to_vec())
                .collect()
        });
        Auth { jwt, api_keys }
    }

    /// True when neither a JWT secret nor API keys are configured: the relay runs open.
    pub fn is_open(&self) -> bool {
        self.jwt.is_none() && self.api_keys.is_none()
    }

    /// True when WebSocket and SSE need a JWT.
    pub fn jwt_required(&self) -> bool {
        self.jwt.is_some()
    }

    /// True when the publish, registry and admin HTTP endpoints need an API key.
    pub fn api_keys_required(&self) -> bool {
        self.api_keys.is_some()
    }

    /// For WebSocket/SSE: the principal behind the token from `Authorization: Bearer`
    /// (`bearer`, already parsed with [`bearer`]; preferred) or the `token` query value
    /// (`token_param`, already percent-decoded). `now_s` is the current time in seconds since
    /// the epoch. Without a JWT secret every request gets [`Principal::open`], and a token that
    /// is supplied anyway is ignored.
    pub fn principal(
        &self,
        bearer: Option<&str>,
        token_param: Option<&str>,
        now_s: u64,
    ) -> Result<Principal, AuthError> {
        let Some(jwt) = &self.jwt else {
            return Ok(Principal::open());
        };
        let non_empty = |t: &&str| !t.is_empty();
        let token = bearer
            .filter(non_empty)
            .or(token_param.filter(non_empty))
            .ok_or(AuthError::Missing)?;
        if !jwt.usable {
            return Err(AuthError::BadSignature);
        }
        match decode::<RawClaims>(token, &jwt.key, &jwt.validation) {
            Ok(data) => claims_to_principal(data.claims, now_s),
            Err(err) => Err(map_jwt_error(err.kind(), token)),
        }
    }

    /// For the HTTP publish, registry and admin endpoints: `authorization` is the raw
    /// `Authorization` header value. Always `Ok` when no API keys are configured.
    pub fn check_api_key(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        let Some(keys) = &self.api_keys else {
            return Ok(());
        };
        let presented = bearer(authorization).ok_or(AuthError::Missing)?;
        // Every key is compared, without stopping at a match, so the time taken does not say
        // which key (if any) matched.
        let found = keys.iter().fold(false, |found, key| {
            found | constant_time_eq(presented.as_bytes(), key)
        });
        if found {
            Ok(())
        } else {
            Err(AuthError::UnknownKey)
        }
    }
}

/// Who is on the other end of a WebSocket or SSE connection, and what they may do.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The JWT `sub`; `None` when the relay runs open (the caller uses the connection id).
    pub user: Option<String>,
    /// The JWT `exp`, seconds since the epoch; the connection is closed (1008) once the clock
    /// reaches it. `None` when open.
    pub expires_at_s: Option<u64>,
    /// The channels it may subscribe and publish to (`channels` and `publish` claims).
    pub grants: Grants,
}

/// The monotonic instant a token's `exp` (seconds since the epoch) falls on, reading the wall
/// clock once: a connection checks its expiry against it without reading the wall clock again.
pub fn expiry_instant(expires_at_s: u64) -> std::time::Instant {
    let left_ms = expires_at_s
        .saturating_mul(1000)
        .saturating_sub(crate::shard::unix_ms());
    std::time::Instant::now() + std::time::Duration::from_millis(left_ms)
}

/// The channels a principal may subscribe and publish to: what a connection keeps of its
/// principal for its whole life.
#[derive(Debug, Clone)]
pub struct Grants {
    subscribe: Scope,
    publish: Scope,
}

impl Grants {
    /// Whether `channel` may be subscribed to.
    pub fn may_subscribe(&self, channel: &str) -> bool {
        self.subscribe.allows(channel)
    }

    /// Whether `channel` may be published to.
    pub fn may_publish(&self, channel: &str) -> bool {
        self.publish.allows(channel)
    }
}

/// The channels one kind of action is allowed on.
#[derive(Debug, Clone)]
enum Scope {
    /// Every channel.
    All,
    /// Channels matching any pattern; an empty set allows none. Boxed: every connection holds
    /// two scopes, and most are `All`.
    Only(Box<GlobSet>),
}

impl Scope {
    fn allows(&self, channel: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Only(set) => set.matches(channel),
        }
    }
}

impl Principal {
    /// Everything allowed, no user, no expiry: the principal of an open relay.
    pub fn open() -> Principal {
        Principal {
            user: None,
            expires_at_s: None,
            grants: Grants {
                subscribe: Scope::All,
                publish: Scope::All,
            },
        }
    }

    /// Whether this principal may subscribe to `channel`.
    pub fn may_subscribe(&self, channel: &str) -> bool {
        self.grants.may_subscribe(channel)
    }

    /// Whether this principal may publish to `channel`.
    pub fn may_publish(&self, channel: &str) -> bool {
        self.grants.may_publish(channel)
    }
}

/// Why a request was not authenticated. Every variant is HTTP 401 `unauthorized`; the variant
/// only chooses the message. No variant carries any part of a token or key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No token or key was presented (or not with the `Bearer` scheme).
    Missing,
    /// The token is not a well-formed JWT.
    Malformed,
    /// The token's signature does not match the configured secret.
    BadSignature,
    /// The token's `exp` has passed.
    Expired,
    /// The token is not signed with HS256 (`none`, HS512, RS256, ...).
    WrongAlgorithm,
    /// A required claim (`sub`, `exp`) is absent.
    MissingClaim(&'static str),
    /// A claim has the wrong type or an unacceptable value (`nbf` in the future).
    BadClaim(&'static str),
    /// The API key is not one of the configured keys.
    UnknownKey,
}

impl AuthError {
    /// The HTTP status: 401 for every variant.
    pub fn status(&self) -> u16 {
        401
    }

    /// The error code of the API's error body: `unauthorized` for every variant.
    pub fn code(&self) -> &'static str {
        "unauthorized"
    }

    /// What went wrong, for the error body. Never quotes the token or key.
    pub fn message(&self) -> String {
        match self {
            AuthError::Missing => "missing bearer token".to_string(),
            AuthError::Malformed => "malformed token".to_string(),
            AuthError::BadSignature => "invalid token signature".to_string(),
            AuthError::Expired => "token expired".to_string(),
            AuthError::WrongAlgorithm => "token algorithm not accepted (HS256 only)".to_string(),
            AuthError::MissingClaim(claim) => format!("token is missing the `{claim}` claim"),
            AuthError::BadClaim(claim) => format!("token claim `{claim}` is invalid"),
            AuthError::UnknownKey => "unknown API key".to_string(),
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for AuthError {}

/// Parses `Bearer <x>` (scheme case-insensitive, one space or more before the credential,
/// trailing spaces dropped); `None` if the header is absent, uses another scheme, or carries
/// no credential.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let value = authorization?.trim_start_matches(' ');
    let scheme = value.get(..6)?;
    let rest = value.get(6..)?;
    if !scheme.eq_ignore_ascii_case("bearer") || !rest.starts_with(' ') {
        return None;
    }
    let credential = rest.trim_matches(' ');
    if credential.is_empty() {
        None
    } else {
        Some(credential)
    }
}

/// Equality of `presented` and `key` in a time that depends only on the key's length: every
/// byte is folded in, with no early return. When the lengths differ the key is compared with
/// itself, so the same pass still runs, and the answer is `false`.
fn constant_time_eq(presented: &[u8], key: &[u8]) -> bool {
    let same_len = presented.len() == key.len();
    let other = if same_len { presented } else { key };
    let diff = key
        .iter()
        .zip(other)
        .fold(0u8, |acc, (a, b)| acc | black_box(a ^ b));
    // `&` rather than `&&`: no branch on either part.
    same_len & (black_box(diff) == 0)
}

/// The claims relay reads. Each field is `None` only when the claim is absent: a present
/// `null` is `Some(Value::Null)`, so it can't pass for an absent claim. Deserializing this
/// can only fail when the payload is not a JSON object (or repeats a claim).
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default, deserialize_with = "present")]
    sub: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    exp: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    nbf: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    channels: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    publish: Option<Value>,
}

fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// Checks the claims of a token whose signature is already verified.
fn claims_to_principal(claims: RawClaims, now_s: u64) -> Result<Principal, AuthError> {
    let user = match claims.sub {
        None => return Err(AuthError::MissingClaim("sub")),
        Some(Value::String(sub)) if !sub.is_empty() => sub,
        Some(_) => return Err(AuthError::BadClaim("sub")),
    };
    let exp = match claims.exp {
        None => return Err(AuthError::MissingClaim("exp")),
        Some(v) => numeric_date(&v).ok_or(AuthError::BadClaim("exp"))?,
    };
    if now_s >= exp {
        return Err(AuthError::Expired);
    }
    if let Some(v) = claims.nbf {
        let nbf = numeric_date(&v).ok_or(AuthError::BadClaim("nbf"))?;
        if now_s < nbf {
            return Err(AuthError::BadClaim("nbf"));
        }
    }
    let subscribe = match claims.channels {
        None => Scope::All,
        Some(v) => Scope::Only(Box::new(
            glob_list(v).ok_or(AuthError::BadClaim("channels"))?,
        )),
    };
    let publish = match claims.publish {
        None => Scope::Only(Box::default()),
        Some(v) => Scope::Only(Box::new(
            glob_list(v).ok_or(AuthError::BadClaim("publish"))?,
        )),
    };
    Ok(Principal {
        user: Some(user),
        expires_at_s: Some(exp),
        grants: Grants { subscribe, publish },
    })
}

/// A JWT NumericDate as whole seconds: a non-negative integer, or a finite non-negative
/// fraction rounded down. Anything else is `None`.
fn numeric_date(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    // 2^64 as f64; `as` saturates anyway, the bound keeps the meaning exact.
    if f.is_finite() && (0.0..18_446_744_073_709_551_616.0).contains(&f) {
        Some(f.floor() as u64)
    } else {
        None
    }
}

/// A claim that must be an array of strings, as a glob set. `None` for anything else.
fn glob_list(v: Value) -> Option<GlobSet> {
    let Value::Array(items) = v else {
        return None;
    };
    let mut patterns = Vec::with_capacity(items.len());
    for item in items {
        let Value::String(pattern) = item else {
            return None;
        };
        patterns.push(pattern);
    }
    Some(GlobSet::new(patterns))
}

/// Maps a decoding failure to the error the client sees.
fn map_jwt_error(kind: &ErrorKind, token: &str) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => AuthError::WrongAlgorithm,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim_name(claim)),
        ErrorKind::ImmatureSignature => AuthError::BadClaim("nbf"),
        ErrorKind::InvalidAudience => AuthError::BadClaim("aud"),
        ErrorKind::InvalidIssuer => AuthError::BadClaim("iss"),
        ErrorKind::InvalidSubject => AuthError::BadClaim("sub"),
        // The header names an algorithm the library has no variant for (`none`, `hs256`): its
        // JSON fails to parse. Tell that apart from a header or payload that is just broken.
        ErrorKind::Json(_) if header_names_other_alg(token) => AuthError::WrongAlgorithm,
        _ => AuthError::Malformed,
    }
}

/// `&'static str` for the claim names the library can report missing.
fn claim_name(claim: &str) -> &'static str {
    match claim {
        "sub" => "sub",
        "exp" => "exp",
        "nbf" => "nbf",
        "aud" => "aud",
        "iss" => "iss",
        _ => "claim",
    }
}

/// Whether the token's header decodes to a JSON object whose `alg` is a string other than
/// HS256. Used only to explain a failure; a header that can't be read says `false`.
fn header_names_other_alg(token: &str) -> bool {
    /// A JOSE header is a few dozen bytes; don't decode a huge one just to explain an error.
    const MAX_HEADER: usize = 4096;
    let Some(segment) = token.split('.').next() else {
        return false;
    };
    if segment.len() > MAX_HEADER {
        return false;
    }
    let Some(bytes) = base64url_decode(segment) else {
        return false;
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(header) => matches!(header.get("alg"), Some(Value::String(alg)) if alg != ACCEPTED_ALG),
        Err(_) => false,
    }
}

/// Unpadded base64url (RFC 4648 section 5), as JWT segments use. `None` on any other byte.
fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    let mut acc: u32 = 0;
    let mut bits: u32 = 0;
    for &c in s.as_bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "test-secret-0123456789";
    const NOW: u64 = 1_700_000_000;

    fn jwt_auth() -> Auth {
        Auth::new(Some(SECRET), None)
    }

    fn sign_with(alg: Algorithm, secret: &str, claims: &Value) -> String {
        encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("test token encodes")
    }

    fn sign(claims: &Value) -> String {
        sign_with(Algorithm::HS256, SECRET, claims)
    }

    fn principal_for(claims: &Value) -> Result<Principal, AuthError> {
        jwt_auth().principal(Some(&sign(claims)), None, NOW)
    }

    /// Test-only unpadded base64url encoder, for hand-made tokens.
    fn b64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }

    fn hand_made(header: &Value, claims: &Value, signature: &str) -> String {
        format!(
            "{}.{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes()),
            signature
        )
    }

    fn valid_claims() -> Value {
        json!({"sub": "alice", "exp": NOW + 60})
    }

    #[test]
    fn valid_token_gives_user_and_expiry() {
        let p = principal_for(&valid_claims()).expect("valid token");
        assert_eq!(p.user.as_deref(), Some("alice"));
        assert_eq!(p.expires_at_s, Some(NOW + 60));
    }

    #[test]
    fn expired_token_is_refused() {
        let claims = json!({"sub": "alice", "exp": NOW - 1});
        assert_eq!(principal_for(&claims).unwrap_err(), AuthError::Expired);
    }

    #[test]
    fn exp_is_the_first_invalid_second() {
        let at_now = json!({"sub": "alice", "exp": NOW});
        assert_eq!(principal_for(&at_now).unwrap_err(), AuthError::Expired);
        let one_more = json!({"sub": "alice", "exp": NOW + 1});
        assert_eq!(
            principal_for(&one_more).expect("valid").expires_at_s,
            Some(NOW + 1)
        );
    }

    #[test]
    fn exp_is_checked_against_now_s_not_the_system_clock() {
        // Long expired by the wall clock, valid at the `now_s` given.
        let token = sign(&json!({"sub": "alice", "exp": 1_000}));
        assert!(jwt_auth().principal(Some(&token), None, 999).is_ok());
        assert_eq!(
            jwt_auth().principal(Some(&token), None, 1_000).unwrap_err(),
            AuthError::Expired
        );
    }

    #[test]
    fn fractional_exp_is_rounded_down() {
        let claims = json!({"sub": "alice", "exp": (NOW as f64) + 0.5});
        assert_eq!(principal_for(&claims).unwrap_err(), AuthError::Expired);
        let claims = json!({"sub": "alice", "exp": (NOW as f64) + 1.5});
        assert_eq!(
            principal_for(&claims).expect("valid").expires_at_s,
            Some(NOW + 1)
        );
    }

    #[test]
    fn bad_exp_types_are_bad_claims() {
        for exp in [json!("soon"), json!(-5), json!(null), json!(true)] {
            let claims = json!({"sub": "alice", "exp": exp});
            assert_eq!(
                principal_for(&claims).unwrap_err(),
                AuthError::BadClaim("exp"),
                "exp = {exp}"
            );
        }
    }

    #[test]
    fn missing_exp_is_a_missing_claim() {
        let claims = json!({"sub": "alice"});
        assert_eq!(
            principal_for(&claims).unwrap_err(),
            AuthError::MissingClaim("exp")
        );
    }

    #[test]
    fn nbf_in_the_future_is_refused() {
        let claims = json!({"sub": "alice", "exp": NOW + 60, "nbf": NOW + 1});
        assert_eq!(
            principal_for(&claims).unwrap_err(),
            AuthError::BadClaim("nbf")
        );
        let claims = json!({"sub": "alice", "exp": NOW + 60, "nbf": NOW});
        assert!(principal_for(&claims).is_ok());
    }

    #[test]
    fn other_secret_is_a_bad_signature() {
        let token = sign_with(Algorithm::HS256, "another-secret", &valid_claims());
        assert_eq!(
            jwt_auth().principal(Some(&token), None, NOW).unwrap_err(),
            AuthError::BadSignature
        );
    }

    #[test]
    fn tampered_payload_is_a_bad_signature() {
        let token = sign(&valid_claims());
        let mut parts = token.split('.');
        let (header, _, sig) = (parts.next(), parts.next(), parts.next());
        let forged_claims = json!({"sub": "mallory", "exp": NOW + 60});
        let forged = format!(
            "{}.{}.{}",
            header.expect("header"),
            b64url(forged_claims.to_string().as_bytes()),
            sig.expect("signature")
        );
        assert_eq!(
            jwt_auth().principal(Some(&forged), None, NOW).unwrap_err(),
            AuthError::BadSignature
        );
    }

    #[test]
    fn malformed_tokens() {
        let valid = sign(&valid_claims());
        let two_segments = valid
            .rsplit_once('.')
            .expect("three segments")
            .0
            .to_string();
        let four_segments = format!("{valid}.x");
        for token in [
            "garbage",
            "a.b",
            two_segments.as_str(),
            four_segments.as_str(),
            "!!!.###.$$$",
            "..",
            "é.é.é",
        ] {
            assert_eq!(
                jwt_auth().principal(Some(token), None, NOW).unwrap_err(),
                AuthError::Malformed,
                "token {token:?}"
            );
        }
    }

    #[test]
    fn payload_that_is_not_an_object_is_malformed() {
        // Correctly signed, but the payload is a JSON array.
        let token = sign(&json!(["alice", NOW + 60]));
        assert_eq!(
            jwt_auth().principal(Some(&token), None, NOW).unwrap_err(),
            AuthError::Malformed
        );
    }

    #[test]
    fn other_algorithms_are_refused() {
        for alg in [Algorithm::HS512, Algorithm::HS384] {
            let token = sign_with(alg, SECRET, &valid_claims());
            assert_eq!(
                jwt_auth().principal(Some(&token), None, NOW).unwrap_err(),
                AuthError::WrongAlgorithm,
                "{alg:?}"
            );
        }
        let rs256 = hand_made(
            &json!({"alg": "RS256", "typ": "JWT"}),
            &valid_claims(),
            "c2lnbmF0dXJl",
        );
        assert_eq!(
            jwt_auth().principal(Some(&rs256), None, NOW).unwrap_err(),
            AuthError::WrongAlgorithm
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let header = json!({"alg": "none", "typ": "JWT"});
        for token in [
            hand_made(&header, &valid_claims(), ""),
            hand_made(&header, &valid_claims(), "c2ln"),
            hand_made(&json!({"alg": "None"}), &valid_claims(), ""),
            hand_made(&json!({"alg": "hs256"}), &valid_claims(), ""),
        ] {
            assert_eq!(
                jwt_auth().principal(Some(&token), None, NOW).unwrap_err(),
                AuthError::WrongAlgorithm
            );
        }
        // A header without any alg is simply malformed.
        let no_alg = hand_made(&json!({"typ": "JWT"}), &valid_claims(), "");
        assert_eq!(
            jwt_auth().principal(Some(&no_alg), None, NOW).unwrap_err(),
            AuthError::Malformed
        );
    }

    #[test]
    fn missing_sub_is_a_missing_claim() {
        let claims = json!({"exp": NOW + 60});
        assert_eq!(
            principal_for(&claims).unwrap_err(),
            AuthError::MissingClaim("sub")
        );
    }

    #[test]
    fn sub_not_a_string_is_a_bad_claim() {
        for sub in [json!(42), json!(null), json!(true), json!("")] {
            let claims = json!({"sub": sub, "exp": NOW + 60});
            assert_eq!(
                principal_for(&claims).unwrap_err(),
                AuthError::BadClaim("sub"),
                "sub = {sub}"
            );
        }
    }

    #[test]
    fn array_or_object_sub_and_exp_are_refused_as_malformed() {
        // jsonwebtoken's own claim pass chokes on these before relay sees the claims, so they
        // come out as `Malformed` rather than `BadClaim`; either way the token is refused.
        for (name, value) in [
            ("sub", json!(["alice"])),
            ("sub", json!({"name": "alice"})),
            ("exp", json!([NOW + 60])),
        ] {
            let mut claims = valid_claims();
            claims[name] = value.clone();
            assert_eq!(
                principal_for(&claims).unwrap_err(),
                AuthError::Malformed,
                "{name} = {value}"
            );
        }
    }

    #[test]
    fn unrelated_claims_are_ignored() {
        let claims = json!({
            "sub": "alice", "exp": NOW + 60, "aud": "someone-else", "iss": "idp",
            "iat": NOW - 10, "extra": {"nested": true}
        });
        assert!(principal_for(&claims).is_ok());
    }

    #[test]
    fn channels_globs_limit_subscriptions() {
        let claims = json!({"sub": "alice", "exp": NOW + 60, "channels": ["doc.*", "chat.lobby"]});
        let p = principal_for(&claims).expect("valid");
        assert!(p.may_subscribe("doc.1"));
        assert!(p.may_subscribe("chat.lobby"));
        assert!(!p.may_subscribe("chat.1"));
        assert!(!p.may_subscribe("doc"));
    }

    #[test]
    fn absent_channels_allows_every_channel() {
        let p = principal_for(&valid_claims()).expect("valid");
        assert!(p.may_subscribe("doc.1"));
        assert!(p.may_subscribe("chat.1"));
        assert!(p.may_subscribe(""));
    }

    #[test]
    fn empty_channels_allows_none() {
        let claims = json!({"sub": "alice", "exp": NOW + 60, "channels": []});
        let p = principal_for(&claims).expect("valid");
        assert!(!p.may_subscribe("doc.1"));
        assert!(!p.may_subscribe(""));
    }

    #[test]
    fn absent_publish_allows_none() {
        let p = principal_for(&valid_claims()).expect("valid");
        assert!(!p.may_publish("doc.1"));
        assert!(!p.may_publish(""));
    }

    #[test]
    fn publish_globs_limit_publishing() {
        let claims = json!({"sub": "alice", "exp": NOW + 60, "publish": ["doc.*"]});
        let p = principal_for(&claims).expect("valid");
        assert!(p.may_publish("doc.1"));
        assert!(!p.may_publish("chat.1"));
        // Publish and subscribe scopes are independent.
        assert!(p.may_subscribe("chat.1"));
        let star = json!({"sub": "alice", "exp": NOW + 60, "publish": ["*"], "channels": []});
        let p = principal_for(&star).expect("valid");
        assert!(p.may_publish("anything.at/all"));
        assert!(!p.may_subscribe("anything.at/all"));
    }

    #[test]
    fn scope_claims_of_the_wrong_type_are_bad_claims() {
        for (name, value) in [
            ("channels", json!("doc.*")),
            ("channels", json!(null)),
            ("channels", json!(["doc.*", 5])),
            ("publish", json!({"doc.*": true})),
            ("publish", json!(null)),
        ] {
            let mut claims = valid_claims();
            claims[name] = value.clone();
            let expected = if name == "channels" {
                AuthError::BadClaim("channels")
            } else {
                AuthError::BadClaim("publish")
            };
            assert_eq!(
                principal_for(&claims).unwrap_err(),
                expected,
                "{name} = {value}"
            );
        }
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(Some("Bearer x")), Some("x"));
        assert_eq!(bearer(Some("bearer   x")), Some("x"));
        assert_eq!(bearer(Some("BEARER x  ")), Some("x"));
        assert_eq!(bearer(Some("Basic x")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(Some("Bearer    ")), None);
        assert_eq!(bearer(Some("Bearerx")), None);
        assert_eq!(bearer(Some("")), None);
        assert_eq!(bearer(Some("Beé")), None);
        assert_eq!(bearer(Some("Bearer\tx")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn header_token_is_preferred_over_query_token() {
        let good = sign(&valid_claims());
        let other = sign(&json!({"sub": "bob", "exp": NOW + 60}));
        let auth = jwt_auth();
        let p = auth
            .principal(Some(&good), Some(&other), NOW)
            .expect("header token");
        assert_eq!(p.user.as_deref(), Some("alice"));
        // A bad header token is not rescued by a good query token.
        assert_eq!(
            auth.principal(Some("garbage"), Some(&good), NOW)
                .unwrap_err(),
            AuthError::Malformed
        );
        // The query token is used when there is no header token.
        let p = auth
            .principal(None, Some(&other), NOW)
            .expect("query token");
        assert_eq!(p.user.as_deref(), Some("bob"));
        let p = auth
            .principal(Some(""), Some(&other), NOW)
            .expect("empty header token ignored");
        assert_eq!(p.user.as_deref(), Some("bob"));
    }

    #[test]
    fn missing_token_when_required() {
        let auth = jwt_auth();
        assert_eq!(
            auth.principal(None, None, NOW).unwrap_err(),
            AuthError::Missing
        );
        assert_eq!(
            auth.principal(None, Some(""), NOW).unwrap_err(),
            AuthError::Missing
        );
    }

    #[test]
    fn empty_secret_refuses_everything() {
        let auth = Auth::new(Some(""), None);
        assert!(auth.jwt_required());
        let token = sign_with(Algorithm::HS256, "", &valid_claims());
        assert_eq!(
            auth.principal(Some(&token), None, NOW).unwrap_err(),
            AuthError::BadSignature
        );
    }

    fn keyed_auth() -> Auth {
        Auth::new(
            None,
            Some(&["key-one".to_string(), "key-two-longer".to_string()]),
        )
    }

    #[test]
    fn api_keys() {
        let auth = keyed_auth();
        assert!(auth.api_keys_required());
        assert!(!auth.jwt_required());
        assert!(!auth.is_open());
        assert_eq!(auth.check_api_key(Some("Bearer key-one")), Ok(()));
        assert_eq!(auth.check_api_key(Some("bearer  key-two-longer")), Ok(()));
        for wrong in ["key-two", "key-onf", "key-one-", "Key-one", "k", "x"] {
            assert_eq!(
                auth.check_api_key(Some(&format!("Bearer {wrong}"))),
                Err(AuthError::UnknownKey),
                "{wrong}"
            );
        }
        assert_eq!(auth.check_api_key(None), Err(AuthError::Missing));
        assert_eq!(
            auth.check_api_key(Some("Basic key-one")),
            Err(AuthError::Missing)
        );
        assert_eq!(auth.check_api_key(Some("Bearer ")), Err(AuthError::Missing));
        assert_eq!(auth.check_api_key(Some("key-one")), Err(AuthError::Missing));
    }

    #[test]
    fn api_keys_only_leaves_websocket_open_and_ignores_tokens() {
        let auth = keyed_auth();
        let p = auth
            .principal(Some("not-even-a-jwt"), Some("x"), NOW)
            .expect("open");
        assert_eq!(p.user, None);
        assert!(p.may_publish("doc.1"));
    }

    #[test]
    fn empty_key_list_fails_closed_and_empty_keys_never_match() {
        let auth = Auth::new(None, Some(&[]));
        assert!(auth.api_keys_required());
        assert_eq!(
            auth.check_api_key(Some("Bearer x")),
            Err(AuthError::UnknownKey)
        );
        let auth = Auth::new(None, Some(&[String::new()]));
        assert_eq!(
            auth.check_api_key(Some("Bearer x")),
            Err(AuthError::UnknownKey)
        );
        assert_eq!(auth.check_api_key(Some("Bearer ")), Err(AuthError::Missing));
    }

    #[test]
    fn jwt_only_leaves_http_endpoints_open() {
        let auth = jwt_auth();
        assert_eq!(auth.check_api_key(None), Ok(()));
        assert_eq!(auth.check_api_key(Some("Bearer whatever")), Ok(()));
    }

    #[test]
    fn both_configured() {
        let auth = Auth::new(Some(SECRET), Some(&["k".to_string()]));
        assert!(auth.jwt_required() && auth.api_keys_required() && !auth.is_open());
        assert_eq!(auth.check_api_key(Some("Bearer k")), Ok(()));
        // The API key is not a JWT, and a JWT is not an API key.
        assert_eq!(
            auth.principal(Some("k"), None, NOW).unwrap_err(),
            AuthError::Malformed
        );
        let token = sign(&valid_claims());
        assert_eq!(
            auth.check_api_key(Some(&format!("Bearer {token}"))),
            Err(AuthError::UnknownKey)
        );
    }

    #[test]
    fn open_mode_allows_everything() {
        let auth = Auth::new(None, None);
        assert!(auth.is_open());
        assert!(!auth.jwt_required());
        assert!(!auth.api_keys_required());
        assert_eq!(auth.check_api_key(None), Ok(()));
        assert_eq!(auth.check_api_key(Some("Basic x")), Ok(()));
        let p = auth.principal(None, None, NOW).expect("open");
        assert_eq!(p.user, None);
        assert_eq!(p.expires_at_s, None);
        assert!(p.may_subscribe("doc.1") && p.may_publish("doc.1"));
        // A token supplied anyway is ignored, even an expired or broken one.
        let expired = sign(&json!({"sub": "alice", "exp": 1}));
        let p = auth
            .principal(Some(&expired), Some("garbage"), NOW)
            .expect("open");
        assert_eq!(p.user, None);
        assert!(p.may_subscribe("x") && p.may_publish("x"));
        let p = Principal::open();
        assert!(p.may_subscribe("") && p.may_publish("a.b/c"));
    }

    #[test]
    fn errors_are_401_unauthorized_and_never_echo_secrets() {
        let token = sign(&json!({"sub": "alice", "exp": NOW - 1}));
        let auth = Auth::new(Some(SECRET), Some(&["sekrit-key".to_string()]));
        let mut errors = vec![
            auth.principal(Some(&token), None, NOW).unwrap_err(),
            auth.principal(Some("garbage-token"), None, NOW)
                .unwrap_err(),
            auth.check_api_key(Some("Bearer wrong-key-value"))
                .unwrap_err(),
        ];
        errors.extend([
            AuthError::Missing,
            AuthError::BadSignature,
            AuthError::WrongAlgorithm,
            AuthError::MissingClaim("sub"),
            AuthError::BadClaim("channels"),
        ]);
        for err in errors {
            assert_eq!(err.status(), 401);
            assert_eq!(err.code(), "unauthorized");
            let shown = format!("{} {:?} {}", err.message(), err, err);
            for secret in [
                token.as_str(),
                "garbage-token",
                "wrong-key-value",
                "sekrit-key",
                SECRET,
            ] {
                assert!(!shown.contains(secret), "{shown:?} leaks {secret:?}");
            }
        }
        assert_eq!(AuthError::Expired.message(), "token expired");
        assert_eq!(AuthError::Missing.message(), "missing bearer token");
        assert!(AuthError::MissingClaim("sub").message().contains("sub"));
        let debug = format!("{auth:?}");
        assert!(
            !debug.contains(SECRET) && !debug.contains("sekrit-key"),
            "{debug}"
        );
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"xbc", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abcd", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
        assert!(!constant_time_eq(b"abc", b""));
    }

    #[test]
    fn base64url_round_trip() {
        for input in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            b"\xff\xfe\x00",
        ] {
            assert_eq!(base64url_decode(&b64url(input)).as_deref(), Some(input));
        }
        assert_eq!(base64url_decode("Zm9v"), Some(b"foo".to_vec()));
        assert_eq!(base64url_decode("-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(base64url_decode("Zm9v="), None);
        assert_eq!(base64url_decode("a+b/"), None);
    }

    #[test]
    fn auth_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Auth>();
        assert_send_sync::<Principal>();
        let auth = std::sync::Arc::new(jwt_auth());
        let token = sign(&valid_claims());
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let auth = auth.clone();
                let token = token.clone();
                std::thread::spawn(move || auth.principal(Some(&token), None, NOW).is_ok())
            })
            .collect();
        for handle in handles {
            assert!(handle.join().expect("thread"));
        }
    }
}
