//! The HTTP API (`/api/v1`): JSON resources for back-office systems, integrations and the
//! website widget, on the same port as the socket. Every error is a status with
//! `{"error": {"code", "message"}}`; the codes are the protocol's where one fits.
//!
//! - [`records`]: contacts, inboxes and opening conversations.
//! - [`conversations`]: reading, listing and updating conversations, and their messages:
//!   answered by the socket codes' own handlers through [`call`].
//! - [`widget`]: widget sessions (a customer token for a website visitor).
//! - [`files`]: uploads and downloads.
//! - [`openapi`]: the OpenAPI document, generated from these handlers, and its page.
//!
//! The unversioned paths of the first API (`/api/rooms`, `/api/contacts`, `/api/inboxes`,
//! `/api/conversations`) are the same handlers.

pub(crate) mod call;
pub(crate) mod conversations;
pub(crate) mod devices;
pub mod files;
pub(crate) mod openapi;
pub(crate) mod records;
pub(crate) mod widget;

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{token_from_request, Claims, Role};
use crate::codec::{ErrorCode, ProtocolError};
use crate::server::{json_response, Body, Shared};

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 64 * 1024;

/// What a handler answers: a response, or an error rendered as one.
pub(crate) type ApiResult = Result<Response<Body>, ApiError>;

/// An error answer: its status, a stable code and a message for people.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The id a message that was not accepted got, to retry with it idempotently.
    pub message_id: Option<String>,
}

/// The error body: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// `BAD_REQUEST`, `UNAUTHORIZED`, `FORBIDDEN`, `NOT_FOUND`, `METHOD_NOT_ALLOWED`,
    /// `CONFLICT`, `TOO_LARGE`, `UNSUPPORTED_MEDIA_TYPE`, `RATE_LIMITED`, `UNAVAILABLE`, …
    pub(crate) code: String,
    pub(crate) message: String,
    /// With `UNAVAILABLE` for a message: the id to retry it with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) message_id: Option<String>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            message_id: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "FORBIDDEN", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "CONFLICT", message)
    }

    /// A store failure: the detail names tables and files, so it goes to the log, not the
    /// client.
    pub(crate) fn storage(error: &storage::Error, tenant: &str, what: &str) -> Self {
        tracing::warn!(error = %error, tenant, "{what} failed in storage");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "storage unavailable, retry later",
        )
    }

    pub(crate) fn response(self) -> Response<Body> {
        let mut response = json_response(
            self.status,
            &ErrorBody {
                error: ErrorDetail {
                    code: self.code.to_owned(),
                    message: self.message,
                    message_id: self.message_id,
                },
            },
        );
        if self.status == StatusCode::SERVICE_UNAVAILABLE || self.status.as_u16() == 429 {
            response
                .headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<ProtocolError> for ApiError {
    fn from(error: ProtocolError) -> Self {
        let (status, code) = match error.code {
            ErrorCode::BadRequest | ErrorCode::UnknownCode => {
                (StatusCode::BAD_REQUEST, "BAD_REQUEST")
            }
            ErrorCode::AuthError => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            ErrorCode::Forbidden | ErrorCode::NotJoined => (StatusCode::FORBIDDEN, "FORBIDDEN"),
            ErrorCode::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            ErrorCode::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "TOO_LARGE"),
            ErrorCode::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED"),
            ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        };
        ApiError {
            status,
            code,
            message: error.message,
            message_id: error.message_id.map(String::from),
        }
    }
}

/// The caller's verified claims; `401` without a valid bearer token.
pub(crate) fn caller(shared: &Shared, req: &Request<Incoming>) -> Result<Arc<Claims>, ApiError> {
    let unauthorized =
        |message: String| ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
    let token =
        token_from_request(req).ok_or_else(|| unauthorized("missing bearer token".into()))?;
    shared
        .verifier
        .verify(&token)
        .map(Arc::new)
        .map_err(|e| unauthorized(e.to_string()))
}

/// `403` unless the caller has one of `roles`.
pub(crate) fn require(claims: &Claims, roles: &[Role], what: &str) -> Result<(), ApiError> {
    if roles.contains(&claims.role) {
        return Ok(());
    }
    let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    Err(ApiError::forbidden(format!(
        "only {} tokens may {what}",
        names.join(", ")
    )))
}

/// The team's roles: everyone but customers.
pub(crate) const TEAM: &[Role] = &[Role::Admin, Role::Agent, Role::Service];

/// Reads a JSON body of at most [`MAX_JSON_BODY`] bytes: `415` for another content type,
/// `413` past the limit, `400` naming the field that does not fit.
pub(crate) async fn json_body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "the body must be application/json",
        ));
    }
    let body = Limited::new(req.into_body(), MAX_JSON_BODY).collect();
    let body = tokio::time::timeout(JSON_BODY_TIMEOUT, body)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "TIMEOUT",
                format!(
                    "the body did not arrive within {} s",
                    JSON_BODY_TIMEOUT.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "TOO_LARGE",
                    "body larger than 64 KiB",
                )
            } else {
                ApiError::bad_request(format!("the body could not be read: {e}"))
            }
        })?
        .to_bytes();
    parse_json(&body)
}

/// Longest a JSON body (at most [`MAX_JSON_BODY`]) may take to arrive: a request whose body
/// never comes does not hold its connection and task.
const JSON_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Parses JSON, naming the field that does not fit in the error.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad_request(if path == "." {
            format!("invalid body: {}", e.into_inner())
        } else {
            format!("invalid body.{path}: {}", e.into_inner())
        })
    })
}

/// `application/x-www-form-urlencoded` pairs (a query string); the last of a repeated key wins.
pub(crate) fn form_pairs(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

/// A path segment with its `%XX` escapes decoded (`+` stays `+`); `400` when that is not
/// UTF-8.
pub(crate) fn percent_decoded(segment: &str) -> Result<String, ApiError> {
    String::from_utf8(percent_decode_bytes(segment, false))
        .map_err(|_| ApiError::bad_request("the path is not UTF-8 once decoded"))
}

fn percent_decode(text: &str) -> String {
    String::from_utf8_lossy(&percent_decode_bytes(text, true)).into_owned()
}

/// `%XX` escapes decoded; `+` is a space in a form (`plus_is_space`), itself in a path.
fn percent_decode_bytes(text: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    out
}

/// A JSON answer with `status`.
pub(crate) fn reply(status: StatusCode, body: &impl Serialize) -> ApiResult {
    Ok(json_response(status, body))
}

/// A JSON answer whose body is already serialized (a protocol reply's `data`).
pub(crate) fn reply_raw(status: StatusCode, json: &serde_json::value::RawValue) -> ApiResult {
    let mut response = Response::new(Body::from(bytes::Bytes::copy_from_slice(
        json.get().as_bytes(),
    )));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Routes a request under `/api`; `None` for any other path.
pub(crate) async fn route(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Option<Response<Body>> {
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/api/")?;
    let rest = rest.strip_prefix("v1/").unwrap_or(rest);
    let segments: Vec<&str> = rest.split('/').collect();
    let method = req.method().clone();
    let started = std::time::Instant::now();
    let metrics_handle = shared.metrics.clone();
    let result = match (segments.as_slice(), &method) {
        (["openapi.json"], &Method::GET) => Ok(openapi::document()),
        (["docs"], &Method::GET) => Ok(openapi::page()),
        (["widget", "sessions"], &Method::POST) => widget::open_session(shared, req, peer).await,
        (["rooms"], &Method::POST) => records::create_room(shared, req).await,
        (["contacts"], &Method::POST) => records::put_contact(shared, req).await,
        (["contacts"], &Method::GET) => records::list_contacts(shared, req).await,
        (["contacts", id], &Method::GET) => records::get_contact(shared, req, id).await,
        (["inboxes"], &Method::POST) => records::put_inbox(shared, req).await,
        (["inboxes"], &Method::GET) => records::list_inboxes(shared, req).await,
        (["inboxes", id], &Method::GET) => records::get_inbox(shared, req, id).await,
        (["conversations"], &Method::POST) => records::open_conversation(shared, req).await,
        (["conversations"], &Method::GET) => conversations::list(shared, req).await,
        (["conversations", id], &Method::GET) => conversations::get(shared, req, id).await,
        (["conversations", id], &Method::PATCH) => conversations::update(shared, req, id).await,
        (["conversations", id, "messages"], &Method::GET) => {
            conversations::messages(shared, req, id).await
        }
        (["conversations", id, "messages"], &Method::POST) => {
            conversations::send(shared, req, id).await
        }
        (["broadcast"], &Method::POST) => conversations::broadcast(shared, req).await,
        (["files"], &Method::POST) => files::upload(shared, req).await,
        (["settings", "files"], &Method::GET) => files::get_limits(shared, req).await,
        (["settings", "files"], &Method::PUT) => files::put_limits(shared, req).await,
        (["files", id], &Method::GET | &Method::HEAD) => files::download(shared, req, id).await,
        (["devices"], &Method::POST) => devices::register(shared, req).await,
        (["devices"], &Method::GET) => devices::list(shared, req).await,
        (["devices", token], &Method::DELETE) => devices::remove(shared, req, token).await,
        (segments, _) => match template(segments) {
            Some((_, allow)) => Ok(method_not_allowed(allow)),
            None => Err(ApiError::not_found("no such route")),
        },
    };
    let response = result.unwrap_or_else(ApiError::response);
    let route = template(&segments).map_or("unknown", |(route, _)| route);
    let metrics = &metrics_handle;
    metrics
        .http_requests
        .with_label_values(&[route, method_label(&method), response.status().as_str()])
        .inc();
    metrics
        .http_seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    Some(response)
}

/// The metrics' `method` label: the standard methods by name, any other as `OTHER` (a client
/// must not be able to grow the label set).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// A known path's pattern (the metrics' `route` label) and the methods it takes.
fn template(segments: &[&str]) -> Option<(&'static str, &'static str)> {
    Some(match segments {
        ["openapi.json"] => ("/api/v1/openapi.json", "GET"),
        ["docs"] => ("/api/v1/docs", "GET"),
        ["widget", "sessions"] => ("/api/v1/widget/sessions", "POST"),
        ["rooms"] => ("/api/v1/rooms", "POST"),
        ["broadcast"] => ("/api/v1/broadcast", "POST"),
        ["files"] => ("/api/v1/files", "POST"),
        ["contacts"] => ("/api/v1/contacts", "GET, POST"),
        ["inboxes"] => ("/api/v1/inboxes", "GET, POST"),
        ["contacts", _] => ("/api/v1/contacts/{contact_id}", "GET"),
        ["inboxes", _] => ("/api/v1/inboxes/{inbox_id}", "GET"),
        ["conversations"] => ("/api/v1/conversations", "GET, POST"),
        ["conversations", _, "messages"] => {
            ("/api/v1/conversations/{room_id}/messages", "GET, POST")
        }
        ["conversations", _] => ("/api/v1/conversations/{room_id}", "GET, PATCH"),
        ["files", _] => ("/api/v1/files/{file_id}", "GET, HEAD"),
        ["settings", "files"] => ("/api/v1/settings/files", "GET, PUT"),
        ["devices"] => ("/api/v1/devices", "GET, POST"),
        ["devices", _] => ("/api/v1/devices/{token}", "DELETE"),
        _ => return None,
    })
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("this path takes {allow}"),
    )
    .response();
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}
