//! Widget sessions: a website visitor's widget trades its inbox's public widget key for a
//! short-lived customer token, bound to a contact (the visitor, known by its device id) and to
//! the contact's support conversation in that inbox (created, or resumed as it is).
//!
//! The key is public (it sits in the page's source), so what protects an inbox is the
//! `Origin` check against the channel's authorized domains and a per-address rate limit. The
//! device id is the visitor's secret: whoever presents it resumes its conversation, so it is
//! long and random (the server makes one when the widget has none yet).

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::{Deserialize, Serialize};
use storage::records::{self, Channel, ChannelKey, Contact, Inbox};
use storage::{RoomKind, Timestamp};
use utoipa::ToSchema;

use super::records::{open, save_contact, Opening, WhenOpen};
use super::{json_body, reply, ApiError, ApiResult, ErrorBody};
use crate::auth::{now_secs, Claims, Role};
use crate::inbox::CustomerView;
use crate::server::Shared;

const MIN_DEVICE_ID: usize = 16;
const MAX_DEVICE_ID: usize = 128;
const MAX_DETAIL_BYTES: usize = 256;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SessionBody {
    /// The inbox's public widget key.
    #[schema(min_length = 1, max_length = 128)]
    widget_key: String,
    /// The visitor's id from an earlier session (16–128 of `A-Z a-z 0-9 - _`); a new visitor
    /// gets one in the answer, to keep.
    #[schema(min_length = 16, max_length = 128, pattern = "^[A-Za-z0-9_-]+$")]
    device_id: Option<String>,
    /// Details the visitor gave (each at most 256 bytes); they update the contact.
    name: Option<String>,
    email: Option<String>,
    phone: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct SessionReply<'a> {
    /// A customer token: the socket's bearer token and this API's.
    token: String,
    expires_at: Timestamp,
    device_id: &'a str,
    contact_id: &'a str,
    room_id: &'a str,
    /// `true` when this session opened the conversation.
    created: bool,
    #[schema(value_type = Object)]
    conversation: CustomerView<'a>,
}

/// Opens a widget session: a customer token bound to the visitor's contact and its support
/// conversation in the widget's inbox.
#[utoipa::path(post, path = "/api/v1/widget/sessions", tag = "widget", request_body = SessionBody,
    security(()),
    responses(
        (status = 201, body = SessionReply),
        (status = 400, body = ErrorBody),
        (status = 401, description = "Unknown widget key", body = ErrorBody),
        (status = 403, description = "Origin outside the inbox's authorized domains", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 429, description = "Too many sessions from this address", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn open_session(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> ApiResult {
    if !shared.widget_sessions.allow(&peer.ip().to_string()) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            "too many widget sessions from this address, retry later",
        ));
    }
    let origin = req
        .headers()
        .get(hyper::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    let body: SessionBody = json_body(req).await?;
    for (field, value) in [
        ("name", &body.name),
        ("email", &body.email),
        ("phone", &body.phone),
    ] {
        if value
            .as_ref()
            .is_some_and(|v| v.is_empty() || v.len() > MAX_DETAIL_BYTES)
        {
            return Err(ApiError::bad_request(format!(
                "{field} must be 1 to 256 bytes"
            )));
        }
    }
    let device_id = match body.device_id {
        Some(id) if valid_device_id(&id) => id,
        Some(_) => {
            return Err(ApiError::bad_request(
                "device_id must be 16 to 128 of A-Z, a-z, 0-9, - and _",
            ))
        }
        None => format!("{}{}", ulid::Ulid::new(), ulid::Ulid::new()),
    };
    let (tenant, inbox) = widget_inbox(&shared, &body.widget_key).await?;
    let Channel::WebWidget {
        authorized_domains, ..
    } = &inbox.channel
    else {
        return Err(unknown_key());
    };
    if !authorized_domains.is_empty()
        && !origin
            .as_deref()
            .is_some_and(|o| origin_allowed(o, authorized_domains))
    {
        return Err(ApiError::forbidden(
            "this origin may not open sessions of this widget",
        ));
    }
    let contact_id = format!("visitor-{device_id}");
    let existing = records::load::<Contact, _>(&shared.store, &tenant, &contact_id)
        .await
        .map_err(|e| ApiError::storage(&e, &tenant, "reading a visitor"))?;
    let contact = match existing {
        Some(found) if body.name.is_none() && body.email.is_none() && body.phone.is_none() => {
            found.value
        }
        found => {
            let mut contact = found.map(|f| f.value).unwrap_or_else(|| Contact {
                contact_id: contact_id.clone(),
                name: format!("Visitor {}", &device_id[device_id.len() - 6..]),
                email: None,
                phone: None,
                avatar_url: None,
                external_ids: Default::default(),
                custom_attributes: Default::default(),
                created_at: Timestamp::now(),
            });
            contact.name = body.name.unwrap_or(contact.name);
            contact.email = body.email.or(contact.email);
            contact.phone = body.phone.or(contact.phone);
            save_contact(&shared, &tenant, contact).await?.0
        }
    };
    let expires = now_secs() + shared.config.widget_session_ttl_secs;
    let claims = Claims {
        sub: contact_id.clone(),
        tenant: tenant.clone(),
        role: Role::Customer,
        exp: expires,
        name: Some(contact.name.clone()),
        aud: None,
        iss: None,
    };
    let opened = open(
        &shared,
        &claims,
        Opening {
            room_id: None,
            kind: RoomKind::Support,
            contact: Some(contact),
            inbox_id: Some(inbox.inbox_id.clone()),
            title: None,
            participants: vec![contact_id.clone()],
            when_open: WhenOpen::Resume,
        },
    )
    .await?;
    let token = shared.verifier.mint(&claims).map_err(|e| {
        tracing::warn!(error = %e, "a widget session could not be signed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "widget sessions need the gateway to sign tokens (--jwt-secret)",
        )
    })?;
    reply(
        StatusCode::CREATED,
        &SessionReply {
            token,
            expires_at: Timestamp(i64::try_from(expires).unwrap_or(i64::MAX / 1000) * 1000),
            device_id: &device_id,
            contact_id: &contact_id,
            room_id: &opened.conversation.room_id,
            created: opened.created,
            conversation: CustomerView::of(&opened.conversation),
        },
    )
}

fn unknown_key() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "unknown widget key",
    )
}

fn valid_device_id(id: &str) -> bool {
    (MIN_DEVICE_ID..=MAX_DEVICE_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The tenant and inbox whose web widget uses `widget_key` now; `401` otherwise.
async fn widget_inbox(shared: &Shared, widget_key: &str) -> Result<(String, Inbox), ApiError> {
    if widget_key.is_empty() || widget_key.len() > 128 {
        return Err(unknown_key());
    }
    let channel = Channel::WebWidget {
        widget_key: widget_key.to_owned(),
        brand_color: None,
        authorized_domains: Vec::new(),
    };
    let key = records::load::<ChannelKey, _>(
        &shared.store,
        ChannelKey::TENANT,
        &ChannelKey::id(&channel),
    )
    .await
    .map_err(|e| ApiError::storage(&e, "-", "reading a widget key"))?
    .ok_or_else(unknown_key)?
    .value;
    let inbox = records::load::<Inbox, _>(&shared.store, &key.tenant_id, &key.inbox_id)
        .await
        .map_err(|e| ApiError::storage(&e, &key.tenant_id, "reading an inbox"))?
        .ok_or_else(unknown_key)?
        .value;
    match &inbox.channel {
        Channel::WebWidget { widget_key: k, .. } if k == widget_key => Ok((key.tenant_id, inbox)),
        _ => Err(unknown_key()),
    }
}

/// Whether `origin` (`https://shop.example.com[:port]`) is one of `domains`: a host
/// (`shop.example.com`), a wildcard for its subdomains (`*.example.com`), or a whole origin
/// (`https://shop.example.com`).
fn origin_allowed(origin: &str, domains: &[String]) -> bool {
    let host_port = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port, |(host, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                host
            } else {
                host_port
            }
        });
    let host = host.to_ascii_lowercase();
    domains.iter().any(|domain| {
        let domain = domain.trim().to_ascii_lowercase();
        if domain.contains("://") {
            return domain.trim_end_matches('/') == origin.to_ascii_lowercase();
        }
        match domain.strip_prefix("*.") {
            Some(parent) => host.ends_with(&format!(".{parent}")),
            None => host == domain,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_hosts_wildcards_and_whole_origins() {
        let domains = vec![
            "shop.example.com".to_owned(),
            "*.acme.io".to_owned(),
            "http://localhost:3000".to_owned(),
        ];
        assert!(origin_allowed("https://shop.example.com", &domains));
        assert!(origin_allowed("https://SHOP.example.com:8443", &domains));
        assert!(origin_allowed("https://eu.acme.io", &domains));
        assert!(origin_allowed("http://localhost:3000", &domains));
        assert!(!origin_allowed("http://localhost:4000", &domains));
        assert!(!origin_allowed("https://acme.io", &domains));
        assert!(!origin_allowed("https://evilshop.example.com", &domains));
        assert!(!origin_allowed(
            "https://shop.example.com.evil.net",
            &domains
        ));
        assert!(!origin_allowed("null", &domains));
    }

    #[test]
    fn device_ids_are_long_and_plain() {
        assert!(valid_device_id("abcdefghijklmnop"));
        assert!(!valid_device_id("short"));
        assert!(!valid_device_id("abcdefghijklmnop/../x"));
        assert!(!valid_device_id(&"a".repeat(129)));
    }
}
