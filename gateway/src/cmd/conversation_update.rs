//! `conversation_update`: the team manages a conversation — open or close it, snooze it until a
//! time, pin it (`show_on_top`), archive it, retitle it, set its priority and labels, add
//! participants, assign it. Agents and admins only; the room need not be joined. Saved, answered
//! and announced by [`Shard::change_conversation`].

use serde_json::value::RawValue;
use storage::Timestamp;

use super::{parse_data, Code, RoomCall};
use crate::codec::{ErrorCode, ProtocolError};
use crate::inbox::{ConversationChange, ConversationPatch};
use crate::shard::Shard;

#[derive(Debug, Clone, PartialEq)]
pub struct ConversationUpdate {
    pub patch: ConversationPatch,
}

impl ConversationUpdate {
    pub fn parse(data: &RawValue) -> Result<ConversationUpdate, ProtocolError> {
        let patch: ConversationPatch = parse_data(data)?;
        patch.validate(Timestamp::now())?;
        Ok(ConversationUpdate { patch })
    }
}

impl Shard {
    pub(crate) fn conversation_update(&mut self, call: RoomCall, update: ConversationUpdate) {
        if !call.conn.claims.role.sees_notes() {
            let error = ProtocolError::new(
                ErrorCode::Forbidden,
                "only agents and admins manage conversations",
            );
            return self.refuse(call, Code::ConversationUpdate, error);
        }
        let change = ConversationChange::Update(update.patch);
        self.change_conversation(call, Code::ConversationUpdate, change);
    }

    /// Answers `code` with `error` (the room stays loaded only if something else keeps it).
    pub(crate) fn refuse(&mut self, call: RoomCall, code: Code, error: ProtocolError) {
        self.reply_error(
            &call.conn,
            code,
            &call.room,
            call.reference.as_deref(),
            error,
        );
        self.maybe_unload(&call.room);
    }
}
