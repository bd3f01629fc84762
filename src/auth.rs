//! Credentials at upgrade → a verified [`Identity`].
//!
//! With a key configured (`--jwt-secret` for HS256, `--jwt-public-key` for
//! RS256/ES256), every WebSocket upgrade needs a JWT, taken from
//! `Authorization: Bearer`, a cookie, or a `token` query parameter (browsers
//! cannot set headers on a WebSocket). Signature, `exp` and `nbf` are always
//! checked, `aud` and `iss` when configured; anything wrong is answered with
//! 401 before the upgrade, so nothing reaches the hub. Without a key the
//! server runs in insecure mode: identities come from the connect URL.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::{identity::Identity, topic::Topic};

/// Why a handshake's credentials were refused (HTTP 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send Authorization: Bearer, the {cookie} cookie or ?token=")]
    Missing { cookie: String },
    #[error("invalid token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token is for another audience")]
    WrongAudience,
    #[error("token is from another issuer")]
    WrongIssuer,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token claims are invalid: {0}")]
    BadClaims(String),
}

impl axum::response::IntoResponse for AuthError {
    /// 401 with the reason, before any upgrade.
    fn into_response(self) -> axum::response::Response {
        let challenge = [(http::header::WWW_AUTHENTICATE, "Bearer")];
        (
            http::StatusCode::UNAUTHORIZED,
            challenge,
            format!("{self}\n"),
        )
            .into_response()
    }
}

/// Why the authentication settings are unusable (a start-up error).
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is neither an EC nor an RSA public key in PEM form")]
    NotAPublicKey { path: String },
    #[error("give either --jwt-secret or --jwt-public-key, not both")]
    BothKeys,
    #[error("--jwt-secret is empty: anyone could sign tokens")]
    EmptySecret,
}

/// The claims wsproto reads from a token.
#[derive(Debug, Deserialize)]
struct Claims {
    /// The user id.
    sub: String,
    exp: u64,
    /// Topic patterns the session may subscribe to (none when absent).
    #[serde(default)]
    subscribe: Vec<String>,
    /// Topic patterns the session may PUBLISH to (none when absent).
    #[serde(default)]
    publish: Vec<String>,
    /// Patterns of the rooms the session may join (none when absent).
    #[serde(default)]
    rooms: Vec<String>,
}

/// Verifies tokens with one key.
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    cookie: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .field("cookie", &self.cookie)
            .finish()
    }
}

/// Where the token and its checks come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthSettings {
    /// HS256 shared secret.
    pub secret: Option<String>,
    /// Path of a PEM public key (EC → ES256, RSA → RS256).
    pub public_key: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Name of the cookie a token may come in.
    pub cookie: String,
}

impl Authenticator {
    /// The authenticator for `settings`, or `None` for insecure mode (no key).
    ///
    /// # Errors
    /// When both kinds of key are given or the key file is unusable.
    pub fn from_settings(
        settings: &AuthSettings,
    ) -> Result<Option<Authenticator>, AuthConfigError> {
        let (key, algorithm) = match (&settings.secret, &settings.public_key) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => return Err(AuthConfigError::BothKeys),
            (Some(secret), None) if secret.is_empty() => return Err(AuthConfigError::EmptySecret),
            (Some(secret), None) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|source| AuthConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                match (
                    DecodingKey::from_ec_pem(&pem),
                    DecodingKey::from_rsa_pem(&pem),
                ) {
                    (Ok(key), _) => (key, Algorithm::ES256),
                    (_, Ok(key)) => (key, Algorithm::RS256),
                    _ => return Err(AuthConfigError::NotAPublicKey { path: path.clone() }),
                }
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.validate_nbf = true;
        validation.leeway = 5;
        match &settings.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
        }
        Ok(Some(Authenticator {
            key,
            validation,
            cookie: settings.cookie.clone(),
        }))
    }

    /// Finds the token of a handshake: the Authorization header, then the
    /// cookie, then the `token` query parameter.
    pub fn token<'a>(
        &self,
        headers: &'a http::HeaderMap,
        query: Option<&'a str>,
    ) -> Option<String> {
        let bearer = bearer_token(headers).map(str::to_owned);
        let cookie = || {
            headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(name, _)| *name == self.cookie)
                .map(|(_, value)| value.to_owned())
        };
        let query = || {
            form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .find(|(key, _)| key == "token")
                .map(|(_, value)| value.into_owned())
        };
        bearer.or_else(cookie).or_else(query)
    }

    /// Verifies a handshake's token and returns the identity it grants.
    ///
    /// # Errors
    /// An [`AuthError`] naming what is wrong.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        query: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let token = self
            .token(headers, query)
            .ok_or_else(|| AuthError::Missing {
                cookie: self.cookie.clone(),
            })?;
        self.verify(&token)
    }

    /// Verifies one token (at the upgrade, or from REFRESH_TOKEN) and
    /// returns the identity it grants.
    ///
    /// # Errors
    /// An [`AuthError`] naming what is wrong.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|err| match err.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                _ => AuthError::Malformed(err.to_string()),
            })?
            .claims;
        let patterns = |names: &[String]| -> Result<Vec<Topic>, AuthError> {
            names
                .iter()
                .map(|name| Topic::parse(name).map_err(|e| AuthError::BadClaims(e.to_string())))
                .collect()
        };
        if claims.sub.is_empty() {
            return Err(AuthError::BadClaims("empty sub".into()));
        }
        // A validly signed exp of 2^63 seconds or more is past what a clock
        // can hold (adding it would panic): refused like any bad claim.
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp))
            .ok_or_else(|| AuthError::BadClaims(format!("exp {} is out of range", claims.exp)))?;
        Ok(Identity {
            user_id: Some(Arc::from(claims.sub.as_str())),
            subscribe: patterns(&claims.subscribe)?,
            publish: patterns(&claims.publish)?,
            rooms: patterns(&claims.rooms)?,
            expires_at: Some(expires_at),
        })
    }
}

/// The credential of an `Authorization: Bearer …` header, if there is one.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Longest [`time_left`] reports: a century, so that callers can add it
/// to an `Instant` without overflow whatever expiry a token names.
pub const MAX_TIME_LEFT: Duration = Duration::from_secs(100 * 365 * 86_400);

/// How long until `expires_at`: zero if it has passed, at most
/// [`MAX_TIME_LEFT`].
pub fn time_left(expires_at: SystemTime) -> Duration {
    expires_at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
        .min(MAX_TIME_LEFT)
}
