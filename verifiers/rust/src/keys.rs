//! The authorization server's signing keys (JWKS), cached. The same
//! behaviour as the gateway's own `JwtVerifier` (src/identity.rs): refetched
//! on an unknown `kid` (key rotation), single-flight (concurrent
//! verifications share one fetch) and negatively cached, so that tokens with
//! made-up `kid`s cannot make the API hammer the authorization server.

use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::DecodingKey;
use serde_json::Value;
use tokio::sync::{Mutex, RwLock};

/// After a fetch, an unknown `kid` triggers no other for this long.
const REFRESH_COOLDOWN: Duration = Duration::from_secs(30);
/// After a failed fetch, nothing is fetched for this long.
const FAILURE_COOLDOWN: Duration = Duration::from_secs(5);
/// A JWKS is a few KiB; more is not a JWKS.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Why no key could be found; becomes the detail of a `token_invalid`.
#[derive(Debug)]
pub(crate) struct KeyError(pub(crate) String);

fn unknown_key() -> KeyError {
    KeyError("the token is signed by a key the authorization server does not list".into())
}

fn unavailable(error: &str) -> KeyError {
    KeyError(format!("the signing keys could not be fetched: {error}"))
}

#[derive(Debug)]
pub(crate) struct KeySource {
    http: reqwest::Client,
    jwks_uri: reqwest::Url,
    keys: RwLock<KeyCache>,
    /// Held while fetching: the single flight.
    refresh: Mutex<()>,
}

#[derive(Debug, Default)]
struct KeyCache {
    keys: Option<Vec<Jwk>>,
    /// The last fetch attempt: when, and why it failed if it did.
    attempt: Option<(Instant, Option<String>)>,
    /// Counts fetch attempts, so a waiter knows whether one happened while it waited.
    generation: u64,
}

impl KeyCache {
    fn find(&self, kid: Option<&str>) -> Option<Jwk> {
        find(self.keys.as_deref()?, kid)
    }

    /// Whether a fetch may be made now; otherwise the error to answer.
    fn may_fetch(&self) -> Result<(), KeyError> {
        match &self.attempt {
            None => Ok(()),
            Some((at, Some(error))) if at.elapsed() < FAILURE_COOLDOWN => Err(unavailable(error)),
            Some((at, None)) if at.elapsed() < REFRESH_COOLDOWN => Err(unknown_key()),
            Some(_) => Ok(()),
        }
    }

    /// The answer of the latest fetch for a key it did not have.
    fn after_fetch(&self) -> KeyError {
        match &self.attempt {
            Some((_, Some(error))) => unavailable(error),
            _ => unknown_key(),
        }
    }
}

/// The key named `kid`, or the only key when the token names none.
fn find(keys: &[Jwk], kid: Option<&str>) -> Option<Jwk> {
    match kid {
        Some(kid) => keys
            .iter()
            .find(|k| k.common.key_id.as_deref() == Some(kid))
            .cloned(),
        None if keys.len() == 1 => keys.first().cloned(),
        None => None,
    }
}

fn decode(jwk: &Jwk) -> Result<DecodingKey, KeyError> {
    DecodingKey::from_jwk(jwk).map_err(|e| KeyError(format!("unusable signing key: {e}")))
}

impl KeySource {
    pub(crate) fn new(http: reqwest::Client, jwks_uri: reqwest::Url) -> Self {
        Self {
            http,
            jwks_uri,
            keys: RwLock::new(KeyCache::default()),
            refresh: Mutex::new(()),
        }
    }

    /// Fetches the JWKS (at most [`MAX_JWKS_BYTES`], no redirects). Keys this
    /// library cannot read (other curves, symmetric keys) are skipped rather
    /// than making the whole set unusable.
    async fn fetch(&self) -> Result<Vec<Jwk>, String> {
        let mut response = self
            .http
            .get(self.jwks_uri.clone())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_redirection() {
            return Err(format!("HTTP {status}; redirects are not followed"));
        }
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let set: Value = serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
        let keys = set
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("not a JWKS: no \"keys\" array")?;
        Ok(keys
            .iter()
            .filter_map(|key| serde_json::from_value::<Jwk>(key.clone()).ok())
            .collect())
    }

    /// The key to verify a token whose header names `kid`.
    pub(crate) async fn key_for(&self, kid: Option<&str>) -> Result<DecodingKey, KeyError> {
        let seen = {
            let cache = self.keys.read().await;
            if let Some(jwk) = cache.find(kid) {
                return decode(&jwk);
            }
            cache.may_fetch()?;
            cache.generation
        };
        let _flight = self.refresh.lock().await;
        {
            // Whoever held the lock before may have fetched what we need.
            let cache = self.keys.read().await;
            if let Some(jwk) = cache.find(kid) {
                return decode(&jwk);
            }
            if cache.generation != seen {
                return Err(cache.after_fetch());
            }
            cache.may_fetch()?;
        }
        let fetched = self.fetch().await;
        let mut cache = self.keys.write().await;
        cache.generation += 1;
        match fetched {
            Ok(keys) => {
                let jwk = find(&keys, kid);
                cache.keys = Some(keys);
                cache.attempt = Some((Instant::now(), None));
                jwk.map_or_else(|| Err(unknown_key()), |jwk| decode(&jwk))
            }
            Err(error) => {
                // Keys fetched before stay usable.
                let answer = unavailable(&error);
                cache.attempt = Some((Instant::now(), Some(error)));
                Err(answer)
            }
        }
    }
}
