//! API keys: `Authorization: Bearer KEY` on every endpoint but `/health` (and `/metrics`
//! unless configured otherwise). No keys configured: the API is open, as before.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::{Choice, ConstantTimeEq};

use super::AppState;
use super::error::ApiError;

/// The accepted keys. Never printed: `Debug` shows only how many there are.
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<Vec<u8>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeyError {
    #[error("an API key must not be empty")]
    Empty,
    #[error("an API key must be printable ASCII without spaces (it travels in an HTTP header)")]
    NotPrintable,
}

impl ApiKeys {
    /// Keys from flags and the comma-separated environment variable; blanks around
    /// commas are ignored, an empty or non-printable key is refused rather than dropped
    /// (a typo must not silently open the API or lock everyone out).
    pub fn new<I: IntoIterator<Item = String>>(keys: I) -> Result<Self, KeyError> {
        let mut out = Vec::new();
        for k in keys {
            if k.is_empty() {
                return Err(KeyError::Empty);
            }
            if !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(KeyError::NotPrintable);
            }
            out.push(k.into_bytes());
        }
        Ok(ApiKeys(out))
    }

    /// Splits `SWITCHYARD_API_KEYS`-style text: `key1,key2`.
    pub fn split_env(value: &str) -> Vec<String> {
        value
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `given` is one of the keys. Every key is compared, each in time that does
    /// not depend on where the bytes differ, so response timing reveals neither which
    /// key matched nor how much of a guess was right (only, at most, a key's length).
    pub fn accepts(&self, given: &[u8]) -> bool {
        self.0
            .iter()
            .fold(Choice::from(0), |acc, k| acc | k.as_slice().ct_eq(given))
            .into()
    }
}

/// Paths reachable without a key.
fn is_open(path: &str, metrics_require_key: bool) -> bool {
    path == "/health" || (path == "/metrics" && !metrics_require_key)
}

/// The `Bearer` credential of an `Authorization` header, if there is one.
fn bearer(req: &Request) -> Option<&[u8]> {
    let value = req.headers().get(header::AUTHORIZATION)?.as_bytes();
    // The scheme is case-insensitive (RFC 9110 11.1).
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(rest.trim_ascii())
}

/// Middleware: 401 in OpenAI's shape for a missing or wrong key.
pub async fn require_key(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &s.http.api_keys;
    if keys.is_empty() || is_open(req.uri().path(), s.http.metrics_require_key) {
        return next.run(req).await;
    }
    match bearer(&req) {
        Some(k) if keys.accepts(k) => next.run(req).await,
        Some(_) => ApiError::Unauthorized("Incorrect API key provided.".into()).into_response(),
        None => ApiError::Unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.".into(),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly_and_only_exactly() {
        let keys = ApiKeys::new(["alpha".to_string(), "beta-2".to_string()]).unwrap();
        assert!(keys.accepts(b"alpha"));
        assert!(keys.accepts(b"beta-2"));
        for wrong in [&b""[..], b"alph", b"alphaa", b"Alpha", b"beta-", b"gamma"] {
            assert!(!keys.accepts(wrong), "{wrong:?}");
        }
        assert!(!ApiKeys::default().accepts(b""));
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");
    }

    #[test]
    fn env_lists_split_on_commas_and_bad_keys_are_refused() {
        assert_eq!(ApiKeys::split_env(" a, b ,,c"), ["a", "b", "c"]);
        assert_eq!(ApiKeys::new([String::new()]).unwrap_err(), KeyError::Empty);
        assert_eq!(
            ApiKeys::new(["a b".to_string()]).unwrap_err(),
            KeyError::NotPrintable
        );
    }

    #[test]
    fn only_health_and_optionally_metrics_are_open() {
        assert!(is_open("/health", true));
        assert!(is_open("/metrics", false));
        assert!(!is_open("/metrics", true));
        assert!(!is_open("/v1/models", false));
        assert!(!is_open("/health/", false));
    }
}
