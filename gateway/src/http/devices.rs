//! Push devices: a user registers the devices it gets pushes on (`POST /api/v1/devices` with
//! the push service's token), lists them and removes one. The gateway puts a user's tokens in
//! each `notifications.push` record; the push worker reports a token the push service no
//! longer knows (`device.tokens`) and the gateway forgets it.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::{Deserialize, Serialize};
use storage::records::{self, Device, Devices};
use storage::Timestamp;
use utoipa::ToSchema;

use super::{caller, reply, ApiError, ApiResult, ErrorBody};
use crate::server::Shared;

/// Longest token taken (FCM's are about 160 characters; APNs' 64 hex digits).
const MAX_TOKEN_BYTES: usize = 4096;

/// A device to register.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeviceBody {
    /// The push service's registration token: 1 to 4096 visible ASCII characters.
    token: String,
    /// `android`, `ios` or `web`.
    platform: String,
}

/// The caller's devices.
#[derive(Serialize, ToSchema)]
pub(crate) struct DeviceList {
    devices: Vec<Device>,
}

fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_BYTES
        && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Registers a device of the caller's (again: it moves to the newest); a user keeps at most
/// 10, the oldest going first.
#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", request_body = DeviceBody,
    responses(
        (status = 201, body = Device),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn register(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    let body: DeviceBody = super::json_body(req).await?;
    if !valid_token(&body.token) {
        return Err(ApiError::bad_request(
            "token: 1 to 4096 visible ASCII characters",
        ));
    }
    if !matches!(body.platform.as_str(), "android" | "ios" | "web") {
        return Err(ApiError::bad_request("platform: one of android, ios, web"));
    }
    let device = Device {
        token: body.token,
        platform: body.platform,
        registered_at: Timestamp::now(),
    };
    let tenant = claims.tenant.as_str();
    records::update::<Devices, _, _>(&shared.store, tenant, &claims.sub, |current| {
        let mut devices = current.cloned().unwrap_or_default();
        devices.register(device.clone());
        Ok(Some(devices))
    })
    .await
    .map_err(|e| ApiError::storage(&e, tenant, "saving a device"))?;
    reply(StatusCode::CREATED, &device)
}

/// The caller's devices, oldest first.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices",
    responses(
        (status = 200, body = DeviceList),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn list(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    let devices = user_devices(&shared, &claims.tenant, &claims.sub)
        .await
        .map_err(|e| ApiError::storage(&e, &claims.tenant, "reading devices"))?;
    reply(StatusCode::OK, &DeviceList { devices })
}

/// Removes one of the caller's devices (signed out, app uninstalled).
#[utoipa::path(delete, path = "/api/v1/devices/{token}", tag = "devices",
    params(("token" = String, Path, description = "The device's token")),
    responses(
        (status = 204),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn remove(shared: Arc<Shared>, req: Request<Incoming>, token: &str) -> ApiResult {
    let claims = caller(&shared, &req)?;
    let token = super::percent_decoded(token)?;
    let forgotten = forget(&shared, &claims.tenant, &claims.sub, &token)
        .await
        .map_err(|e| ApiError::storage(&e, &claims.tenant, "removing a device"))?;
    if !forgotten {
        return Err(ApiError::not_found("no such device"));
    }
    let mut response = hyper::Response::new(crate::server::Body::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

/// A user's registered devices.
pub(crate) async fn user_devices(
    shared: &Shared,
    tenant: &str,
    user: &str,
) -> storage::Result<Vec<Device>> {
    let found = records::load::<Devices, _>(&shared.store, tenant, user).await?;
    Ok(found.map(|d| d.value.devices).unwrap_or_default())
}

/// Forgets a user's device token; whether it was registered.
pub(crate) async fn forget(
    shared: &Shared,
    tenant: &str,
    user: &str,
    token: &str,
) -> storage::Result<bool> {
    let mut forgotten = false;
    records::update::<Devices, _, _>(&shared.store, tenant, user, |current| {
        let Some(current) = current else {
            return Ok(None);
        };
        let mut devices = current.clone();
        forgotten = devices.forget(token);
        Ok(forgotten.then_some(devices))
    })
    .await?;
    Ok(forgotten)
}
