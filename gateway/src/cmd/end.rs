//! `end`: the conversation is over (`status: ended`, closed), with a reason: `user_ended` from
//! its customer (the only reason a customer may give, and the default), `agent_ended`,
//! `resolved` or `timeout` from the team or a service. Once: ending an ended conversation is
//! `BAD_REQUEST`. Saved, answered and announced by [`Shard::change_conversation`].

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{parse_data, Code, RoomCall};
use crate::auth::Role;
use crate::codec::{ErrorCode, ProtocolError};
use crate::inbox::{ConversationChange, EndReason};
use crate::shard::Shard;

#[derive(Debug, Clone, PartialEq)]
pub struct End {
    pub reason: Option<EndReason>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Data {
    reason: Option<EndReason>,
}

impl End {
    pub fn parse(data: &RawValue) -> Result<End, ProtocolError> {
        let Data { reason } = parse_data(data)?;
        Ok(End { reason })
    }
}

impl Shard {
    pub(crate) fn end(&mut self, call: RoomCall, end: End) {
        let reason = match (call.conn.claims.role, end.reason) {
            (Role::Customer, None | Some(EndReason::UserEnded)) => EndReason::UserEnded,
            (Role::Customer, Some(_)) => {
                let error = ProtocolError::new(
                    ErrorCode::Forbidden,
                    "a customer ends a conversation with reason user_ended",
                );
                return self.refuse(call, Code::End, error);
            }
            (Role::User, _) => {
                let error = ProtocolError::new(
                    ErrorCode::Forbidden,
                    "only the conversation's customer, the team or a service end it",
                );
                return self.refuse(call, Code::End, error);
            }
            (_, None) => EndReason::AgentEnded,
            (_, Some(reason)) => reason,
        };
        self.change_conversation(call, Code::End, ConversationChange::End(reason));
    }
}
