//! `subscribe_dashboard`: an agent's or admin's connection follows its tenant's live counters
//! (the `overview` dashboard, see `crate::analytics`): the reply carries them, and a
//! `dashboard_response` follows whenever they change (at most once a second).
//! `{"subscribed": false}` ends it, as closing the connection does. No `room_id`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{parse_data, Code};
use crate::analytics::{Counters, OVERVIEW};
use crate::codec::{ErrorCode, FrameBuilder, ProtocolError};
use crate::server::Shared;
use crate::shard::ConnRef;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeDashboard {
    pub subscribed: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Data {
    dashboard_id: Option<String>,
    #[serde(default = "super::yes")]
    subscribed: bool,
}

#[derive(Serialize)]
struct Reply<'a> {
    dashboard_id: &'a str,
    tenant: &'a str,
    subscribed: bool,
    counters: Counters,
}

impl SubscribeDashboard {
    pub fn parse(data: &RawValue) -> Result<SubscribeDashboard, ProtocolError> {
        let Data {
            dashboard_id,
            subscribed,
        } = parse_data(data)?;
        if dashboard_id.as_deref().is_some_and(|id| id != OVERVIEW) {
            return Err(ProtocolError::new(
                ErrorCode::NotFound,
                "no such dashboard: data.dashboard_id is \"overview\"",
            ));
        }
        Ok(SubscribeDashboard { subscribed })
    }

    /// Runs on the connection's task (no room involved); returns the reply.
    pub(crate) fn apply(
        self,
        shared: &Shared,
        conn: &ConnRef,
        reference: Option<&str>,
    ) -> Result<bytes::Bytes, ProtocolError> {
        super::team_only(conn, "follow the dashboard")?;
        let counters = shared.dashboards.subscribe(shared, conn, self.subscribed);
        Ok(FrameBuilder::success(
            Code::SubscribeDashboard.response(),
            &conn.claims.sub,
            None,
            reference,
            Reply {
                dashboard_id: OVERVIEW,
                tenant: &conn.claims.tenant,
                subscribed: self.subscribed,
                counters,
            },
        ))
    }
}
