//! `conversation_update`: the team manages a conversation — open or close it, snooze it until a
//! time, pin it (`show_on_top`), archive it, retitle it, set its priority and labels, add
//! participants, assign it. Agents and admins only; the room need not be joined. The change is
//! saved (re-read and re-applied when another writer got there first), then answered, and every
//! member of the conversation and every inbox subscriber of the tenant gets a
//! `conversation_response` event.

use serde_json::value::RawValue;
use storage::records::Conversation;
use storage::{RoomKey, Timestamp};

use super::{parse_data, Code, RoomCall};
use crate::auth::may_join;
use crate::codec::{ErrorCode, FrameBuilder, ProtocolError};
use crate::inbox::{self, AgentView, ChangeKind, ConversationPatch};
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::shard::{access_error, server_busy, storage_unavailable, Shard, ShardEvent, Slot};

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
        let Some(Slot::Ready(state)) = self.rooms.get(&call.room) else {
            return;
        };
        let refusal = if !call.conn.claims.role.sees_notes() {
            Some(ProtocolError::new(
                ErrorCode::Forbidden,
                "only agents and admins manage conversations",
            ))
        } else {
            access_error(may_join(&call.conn.claims, &state.room))
        };
        if let Some(error) = refusal {
            self.reply_error(
                &call.conn,
                Code::ConversationUpdate,
                &call.room,
                call.reference.as_deref(),
                error,
            );
            return self.maybe_unload(&call.room);
        }
        let Some(permit) = self.try_work() else {
            self.reply_error(
                &call.conn,
                Code::ConversationUpdate,
                &call.room,
                call.reference.as_deref(),
                server_busy(),
            );
            return self.maybe_unload(&call.room);
        };
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(&call.room) {
            // Loaded until the answer is out: the event goes to its members.
            state.inflight += 1;
        }
        let store = self.shared.store.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = inbox::update_conversation(&store, &call.room, &update.patch).await;
            let _ = events
                .send(ShardEvent::Continue(Box::new(move |shard: &mut Shard| {
                    shard.conversation_updated(call, update.patch, result)
                })))
                .await;
            drop(permit);
        });
    }

    fn conversation_updated(
        &mut self,
        call: RoomCall,
        patch: ConversationPatch,
        result: storage::Result<Option<Conversation>>,
    ) {
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(&call.room) {
            state.inflight = state.inflight.saturating_sub(1);
        }
        let conversation = match result {
            Ok(Some(conversation)) => conversation,
            Ok(None) => {
                let error = ProtocolError::new(ErrorCode::NotFound, "not a conversation");
                self.reply_error(
                    &call.conn,
                    Code::ConversationUpdate,
                    &call.room,
                    call.reference.as_deref(),
                    error,
                );
                return self.maybe_unload(&call.room);
            }
            Err(e) => {
                tracing::warn!(room_id = %call.room.room_id, error = %e, "updating a conversation failed");
                self.reply_error(
                    &call.conn,
                    Code::ConversationUpdate,
                    &call.room,
                    call.reference.as_deref(),
                    storage_unavailable(),
                );
                return self.maybe_unload(&call.room);
            }
        };
        self.add_participants(&call.room, &patch.add_participants);
        let participants = self.participants(&call.room);
        self.shared
            .metrics
            .frames_out(OutCode::Response(Code::ConversationUpdate), 1);
        let reply = FrameBuilder::success(
            Code::ConversationUpdate.response(),
            &call.conn.claims.sub,
            Some(&call.room.room_id),
            call.reference.as_deref(),
            AgentView {
                conversation: &conversation,
                participants: &participants,
            },
        );
        self.route().send(&call.conn, reply, FrameClass::Durable);
        self.conversation_event(
            &call.room,
            &conversation,
            (ChangeKind::Updated, &call.conn.claims.sub),
            Some(call.conn.id),
            true,
        );
        self.maybe_unload(&call.room);
    }

    /// Adds participants the store now has to the loaded room (its access checks read them).
    pub(crate) fn add_participants(&mut self, room: &RoomKey, users: &[String]) {
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(room) {
            for user in users {
                if !state.room.participants.contains(user) {
                    state.room.participants.push(user.clone());
                }
            }
        }
    }

    /// The loaded room's participants.
    pub(crate) fn participants(&self, room: &RoomKey) -> Vec<String> {
        match self.rooms.get(room) {
            Some(Slot::Ready(state)) => state.room.participants.clone(),
            _ => Vec::new(),
        }
    }
}
