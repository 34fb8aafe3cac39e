//! Device authentication: `Authorization: Bearer <token>` against the store,
//! and authorization of the `{device}` path segment.
//!
//! Owns the decision 401 versus 403 only; the HTTP shape of the rejection is
//! [`crate::api::ApiError`]'s. Invariants: an unknown and a revoked token are
//! indistinguishable to the client (both 401), and a device can only reach its
//! own `/v1/devices/{device}/...` paths (403 otherwise, whether or not the
//! other device exists).

use axum::extract::{FromRef, FromRequestParts, Path};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, request::Parts};

use crate::api::ApiError;
use crate::store::{Store, StoreError};

/// Result alias for this module.
pub type Result<T, E = AuthError> = std::result::Result<T, E>;

/// Why a request was not authorized.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing Authorization header")]
    MissingHeader,
    /// An `Authorization` header that is not `Bearer <token>`.
    #[error("Authorization header is not `Bearer <token>`")]
    MalformedHeader,
    /// The token belongs to no device, or to a revoked one.
    #[error("unknown or revoked token")]
    InvalidToken,
    /// A valid token used on another device's path.
    #[error("token of device {token_device:?} may not access device {path_device:?}")]
    WrongDevice {
        /// Device the token belongs to.
        token_device: String,
        /// Device named in the path.
        path_device: String,
    },
    /// The store could not be asked.
    #[error("cannot look up token")]
    Store(#[source] StoreError),
}

/// The bearer token of a request.
///
/// # Errors
/// [`AuthError::MissingHeader`] or [`AuthError::MalformedHeader`].
pub fn bearer_token(headers: &HeaderMap) -> Result<&str> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::MissingHeader)?;
    if values.next().is_some() {
        return Err(AuthError::MalformedHeader);
    }
    let value = value.to_str().map_err(|_| AuthError::MalformedHeader)?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MalformedHeader)?;
    let token = token.trim_start();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.contains(char::is_whitespace)
    {
        return Err(AuthError::MalformedHeader);
    }
    Ok(token)
}

/// Extractor: the request carries the token of the device named by the
/// route's `{device}` path parameter.
///
/// Runs before the body is read, so unauthenticated uploads are refused
/// without buffering or decompressing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAuth {
    /// The authenticated device id (equal to the path's `{device}`).
    pub device: String,
}

impl<S> FromRequestParts<S> for DeviceAuth
where
    Store: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &S,
    ) -> std::result::Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)?;
        let store = Store::from_ref(state);
        let device = store
            .authenticate(token)
            .await
            .map_err(AuthError::Store)?
            .ok_or(AuthError::InvalidToken)?;
        let Path(path_device) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(ApiError::BadPath)?;
        if path_device != device {
            return Err(AuthError::WrongDevice {
                token_device: device,
                path_device,
            }
            .into());
        }
        Ok(DeviceAuth { device })
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(AUTHORIZATION, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn accepts_bearer_tokens() {
        assert_eq!(bearer_token(&headers(&["Bearer abc"])).ok(), Some("abc"));
        assert_eq!(bearer_token(&headers(&["bearer  abc "])).ok(), Some("abc"));
    }

    #[test]
    fn rejects_missing_and_malformed_headers() {
        assert!(matches!(
            bearer_token(&headers(&[])),
            Err(AuthError::MissingHeader)
        ));
        for bad in [
            &["Basic abc"][..],
            &["Bearer"],
            &["Bearer "],
            &["Bearer a b"],
            &["abc"],
            &["Bearer a", "Bearer b"],
        ] {
            assert!(
                matches!(bearer_token(&headers(bad)), Err(AuthError::MalformedHeader)),
                "{bad:?}"
            );
        }
    }
}
