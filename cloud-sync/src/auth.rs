//! Authentication and authorization: who a request comes from (a bearer
//! token of a device or an operator, or a device's TLS client certificate)
//! and whether that principal may use the route.
//!
//! Owns the decision 401 versus 403 only; the HTTP shape of the rejection is
//! [`crate::api::ApiError`]'s. Invariants:
//! - an unknown and a revoked credential are indistinguishable to the
//!   client (both 401);
//! - a device can only reach its own `/v1/devices/{device}/...` paths (403
//!   otherwise, whether or not the other device exists);
//! - an operator reads every device and the fleet summary but never
//!   uploads (403 on the upload routes);
//! - a client certificate authenticates the device its subject CN names
//!   (see [`crate::tls`]), and only while that device is registered and not
//!   revoked: `devices revoke` refuses the certificate as it does the token.
//!   With an `Authorization` header present, the token decides and the
//!   certificate is not consulted.

use axum::extract::{FromRef, FromRequestParts, Path};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, request::Parts};

use crate::api::ApiError;
pub use crate::store::Principal;
use crate::store::{Store, StoreError};
use crate::tls::ClientCertificate;

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
    /// A valid device credential used on another device's path.
    #[error("device {token_device:?} may not access device {path_device:?}")]
    WrongDevice {
        /// Device the credential belongs to.
        token_device: String,
        /// Device named in the path.
        path_device: String,
    },
    /// The client certificate (signed by the configured CA) names no
    /// registered, non-revoked device.
    #[error("client certificate names no active device ({reason})")]
    InvalidCertificate {
        /// Why: the CN is missing or not a device id, or the device is
        /// unknown or revoked.
        reason: &'static str,
    },
    /// An operator token on an upload route.
    #[error("operator {operator:?} may read but not upload")]
    OperatorCannotUpload {
        /// The operator's name.
        operator: String,
    },
    /// A device credential on an operator-only route.
    #[error("device {device:?} may not read the fleet summary")]
    NotAnOperator {
        /// The device.
        device: String,
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

/// The principal behind a request: the bearer token's owner when an
/// `Authorization` header is present, otherwise the device named by a
/// verified client certificate.
///
/// # Errors
/// 401-class [`AuthError`]s, or [`AuthError::Store`].
pub async fn principal(parts: &Parts, store: &Store) -> Result<Principal> {
    if parts.headers.contains_key(AUTHORIZATION) {
        let token = bearer_token(&parts.headers)?;
        return store
            .authenticate_principal(token)
            .await
            .map_err(AuthError::Store)?
            .ok_or(AuthError::InvalidToken);
    }
    let Some(certificate) = parts.extensions.get::<ClientCertificate>() else {
        return Err(AuthError::MissingHeader);
    };
    let Some(device) = certificate.device.as_deref() else {
        return Err(AuthError::InvalidCertificate {
            reason: "its subject CN is not a valid device id",
        });
    };
    if store
        .device_is_active(device)
        .await
        .map_err(AuthError::Store)?
    {
        Ok(Principal::Device(device.to_owned()))
    } else {
        Err(AuthError::InvalidCertificate {
            reason: "the device is unknown or revoked",
        })
    }
}

async fn path_device<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
) -> std::result::Result<String, ApiError> {
    let Path(device) = Path::<String>::from_request_parts(parts, state)
        .await
        .map_err(ApiError::BadPath)?;
    Ok(device)
}

/// Extractor for upload routes: the request comes from the device named by
/// the route's `{device}` path parameter (operators are refused).
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
        let store = Store::from_ref(state);
        let who = principal(parts, &store).await?;
        let path_device = path_device(parts, state).await?;
        match who {
            Principal::Device(device) if device == path_device => Ok(DeviceAuth { device }),
            Principal::Device(device) => Err(AuthError::WrongDevice {
                token_device: device,
                path_device,
            }
            .into()),
            Principal::Operator(operator) => {
                Err(AuthError::OperatorCannotUpload { operator }.into())
            }
        }
    }
}

/// Extractor for per-device read routes: the device named by the path
/// itself, or any operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadAuth {
    /// The device whose data is read (the path's `{device}`).
    pub device: String,
    /// Who reads it.
    pub principal: Principal,
}

impl<S> FromRequestParts<S> for ReadAuth
where
    Store: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &S,
    ) -> std::result::Result<Self, ApiError> {
        let store = Store::from_ref(state);
        let who = principal(parts, &store).await?;
        let device = path_device(parts, state).await?;
        match &who {
            Principal::Device(own) if *own != device => Err(AuthError::WrongDevice {
                token_device: own.clone(),
                path_device: device,
            }
            .into()),
            _ => Ok(ReadAuth {
                device,
                principal: who,
            }),
        }
    }
}

/// Extractor for operator-only routes (the fleet summary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorAuth {
    /// The operator's name.
    pub operator: String,
}

impl<S> FromRequestParts<S> for OperatorAuth
where
    Store: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &S,
    ) -> std::result::Result<Self, ApiError> {
        let store = Store::from_ref(state);
        match principal(parts, &store).await? {
            Principal::Operator(operator) => Ok(OperatorAuth { operator }),
            Principal::Device(device) => Err(AuthError::NotAnOperator { device }.into()),
        }
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
