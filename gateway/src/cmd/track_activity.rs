//! `track_activity` and `page_view`: what a widget visitor (or anyone connected) does, handed to
//! the analytics sink (see `crate::analytics`) and counted on the tenant's dashboard. No reply
//! on success, like `typing`: the events are best effort and never wait for anything (a full
//! sink drops them, counted in `gateway_analytics_events_total{outcome="dropped"}`). `room_id`
//! is optional and recorded when given.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::parse_data;
use crate::analytics::AnalyticsEvent;
use crate::codec::{ErrorCode, ProtocolError};
use crate::server::Shared;
use crate::shard::ConnRef;

/// Longest activity name, page, referrer and title, and largest `data`, in bytes.
const MAX_ACTIVITY_BYTES: usize = 64;
const MAX_URL_BYTES: usize = 2048;
const MAX_TITLE_BYTES: usize = 256;
const MAX_DATA_BYTES: usize = 4096;

/// An analytics event from a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Tracked {
    Activity {
        activity: String,
        data: Map<String, Value>,
    },
    PageView {
        page: String,
        referrer: Option<String>,
        title: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivityData {
    activity: String,
    #[serde(default)]
    data: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageViewData {
    page: String,
    referrer: Option<String>,
    title: Option<String>,
}

fn bounded(field: &str, text: &str, max: usize) -> Result<(), ProtocolError> {
    if text.is_empty() {
        return Err(ProtocolError::bad_request(format!("data.{field} is empty")));
    }
    if text.len() > max {
        return Err(ProtocolError::new(
            ErrorCode::TooLarge,
            format!("data.{field} is longer than {max} bytes"),
        ));
    }
    Ok(())
}

impl Tracked {
    pub fn parse_activity(data: &RawValue) -> Result<Tracked, ProtocolError> {
        let ActivityData { activity, data } = parse_data(data)?;
        bounded("activity", &activity, MAX_ACTIVITY_BYTES)?;
        if serde_json::to_vec(&data).map_or(0, |v| v.len()) > MAX_DATA_BYTES {
            return Err(ProtocolError::new(
                ErrorCode::TooLarge,
                "data.data is larger than 4096 bytes",
            ));
        }
        Ok(Tracked::Activity { activity, data })
    }

    pub fn parse_page_view(data: &RawValue) -> Result<Tracked, ProtocolError> {
        let PageViewData {
            page,
            referrer,
            title,
        } = parse_data(data)?;
        bounded("page", &page, MAX_URL_BYTES)?;
        if let Some(referrer) = &referrer {
            bounded("referrer", referrer, MAX_URL_BYTES)?;
        }
        if let Some(title) = &title {
            bounded("title", title, MAX_TITLE_BYTES)?;
        }
        Ok(Tracked::PageView {
            page,
            referrer,
            title,
        })
    }

    /// Hands the event to the sink and counts it on the tenant's dashboard.
    pub(crate) fn apply(self, shared: &Shared, conn: &ConnRef, room_id: Option<&str>) {
        let (kind, fields, page_view) = match self {
            Tracked::Activity { activity, data } => (
                "activity",
                json!({"activity": activity, "data": data}),
                false,
            ),
            Tracked::PageView {
                page,
                referrer,
                title,
            } => (
                "page_view",
                json!({"page": page, "referrer": referrer, "title": title}),
                true,
            ),
        };
        shared.analytics.offer(&AnalyticsEvent {
            kind,
            tenant_id: &conn.claims.tenant,
            user_id: &conn.claims.sub,
            role: conn.claims.role.as_str(),
            room_id,
            at: storage::Timestamp::now(),
            fields,
        });
        shared.dashboards.count(&conn.claims.tenant, page_view);
    }
}
