//! `subscribe_inbox`: an agent's or admin's connection follows its tenant's inbox — every
//! `conversation_response` event of every conversation of the tenant (changes, and new messages
//! that move a conversation to the top). `data: {"subscribed": false}` ends it; closing the
//! connection does too. No `room_id`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{parse_data, Code};
use crate::codec::{FrameBuilder, ProtocolError};
use crate::server::Shared;
use crate::shard::ConnRef;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeInbox {
    pub subscribed: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Data {
    #[serde(default = "super::yes")]
    subscribed: bool,
}

#[derive(Serialize)]
struct Reply<'a> {
    tenant: &'a str,
    subscribed: bool,
}

impl SubscribeInbox {
    pub fn parse(data: &RawValue) -> Result<SubscribeInbox, ProtocolError> {
        let Data { subscribed } = parse_data(data)?;
        Ok(SubscribeInbox { subscribed })
    }

    /// Runs on the connection's task (no room involved); returns the reply.
    pub(crate) fn apply(
        self,
        shared: &Shared,
        conn: &ConnRef,
        reference: Option<&str>,
    ) -> Result<bytes::Bytes, ProtocolError> {
        super::team_only(conn, "follow the inbox")?;
        if self.subscribed {
            shared.inbox.subscribe(conn);
        } else {
            shared.inbox.unsubscribe(&conn.claims.tenant, conn.id);
        }
        Ok(FrameBuilder::success(
            Code::SubscribeInbox.response(),
            &conn.claims.sub,
            None,
            reference,
            Reply {
                tenant: &conn.claims.tenant,
                subscribed: self.subscribed,
            },
        ))
    }
}
