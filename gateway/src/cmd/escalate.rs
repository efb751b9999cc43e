//! `escalate`: the conversation asks for a human. From `new`, `active` or `ai` it joins its
//! tenant's support queue (`queued`); from `agent`, only the team may escalate it, and it waits
//! for another agent (`escalated`, unassigned). Its customer, the team or a service may send it
//! (not a plain team-room `user`); `reason` is kept in `metrics.escalation_reason`. An agent
//! takes a waiting conversation by assigning it (`conversation_update` with `assignee`).
//! Saved, answered and announced by [`Shard::change_conversation`]; the positions by
//! [`crate::queue`].

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{parse_data, Code, RoomCall};
use crate::auth::Role;
use crate::codec::{ErrorCode, ProtocolError};
use crate::inbox::ConversationChange;
use crate::shard::Shard;

/// Longest escalation reason, in bytes.
pub const MAX_REASON_BYTES: usize = 500;

#[derive(Debug, Clone, PartialEq)]
pub struct Escalate {
    pub reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Data {
    reason: Option<String>,
}

impl Escalate {
    pub fn parse(data: &RawValue) -> Result<Escalate, ProtocolError> {
        let Data { reason } = parse_data(data)?;
        if reason.as_ref().is_some_and(|r| r.len() > MAX_REASON_BYTES) {
            return Err(ProtocolError::new(
                ErrorCode::TooLarge,
                "data.reason is longer than 500 bytes",
            ));
        }
        Ok(Escalate { reason })
    }
}

impl Shard {
    pub(crate) fn escalate(&mut self, call: RoomCall, escalate: Escalate) {
        let by_team = match call.conn.claims.role {
            Role::User => {
                let error = ProtocolError::new(
                    ErrorCode::Forbidden,
                    "only the conversation's customer, the team or a service escalate it",
                );
                return self.refuse(call, Code::Escalate, error);
            }
            Role::Customer => false,
            _ => true,
        };
        let change = ConversationChange::Escalate {
            reason: escalate.reason,
            by_team,
        };
        self.change_conversation(call, Code::Escalate, change);
    }
}
