//! `conversation_get`: a conversation's state, as the caller may see it (the team's view for
//! agents and admins, the customer's view otherwise), with the caller's unread count in it. The
//! same access as `join`; the room need not be joined.

use serde::Serialize;
use serde_json::value::RawValue;
use storage::records::{self, Conversation};
use storage::Store;

use super::{parse_data, Code, RoomCall};
use crate::auth::may_join;
use crate::codec::{ErrorCode, FrameBuilder, ProtocolError};
use crate::inbox::{AgentView, CustomerView};
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::queue::QueuePosition;
use crate::shard::{access_error, server_busy, storage_unavailable, Route, Shard, Slot};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationGet;

impl ConversationGet {
    pub fn parse(data: &RawValue) -> Result<ConversationGet, ProtocolError> {
        parse_data::<serde::de::IgnoredAny>(data)?;
        Ok(ConversationGet)
    }
}

#[derive(Serialize)]
struct Reply<V: Serialize> {
    #[serde(flatten)]
    view: V,
    unread_count: u64,
    /// Where it stands in the support queue while it waits for an agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<QueuePosition>,
}

impl Shard {
    pub(crate) fn conversation_get(&mut self, call: RoomCall, _get: ConversationGet) {
        let Some(Slot::Ready(state)) = self.rooms.get(&call.room) else {
            return;
        };
        if let Some(error) = access_error(may_join(&call.conn.claims, &state.room)) {
            self.reply_error(
                &call.conn,
                Code::ConversationGet,
                &call.room,
                call.reference.as_deref(),
                error,
            );
            return self.maybe_unload(&call.room);
        }
        let participants = state.room.participants.clone();
        let Some(permit) = self.try_work() else {
            self.reply_error(
                &call.conn,
                Code::ConversationGet,
                &call.room,
                call.reference.as_deref(),
                server_busy(),
            );
            return self.maybe_unload(&call.room);
        };
        let store = self.shared.store.clone();
        let (shared, here) = (self.shared.clone(), self.index);
        self.maybe_unload(&call.room);
        tokio::spawn(async move {
            let RoomCall {
                conn,
                room,
                reference,
                ..
            } = call;
            let team = conn.claims.role.sees_notes();
            let read = async {
                let conversation =
                    records::load::<Conversation, _>(&store, &room.tenant_id, &room.room_id)
                        .await?;
                let unread = store.read_state(&room, &conn.claims.sub).await?;
                Ok::<_, storage::Error>(conversation.map(|c| (c.value, unread.unread_for(team))))
            };
            let frame = match read.await {
                Ok(Some((conversation, unread_count))) => {
                    let queue = shared.queue.position(&room);
                    let (code, user, room_id) = (
                        Code::ConversationGet.response(),
                        &conn.claims.sub,
                        Some(room.room_id.as_str()),
                    );
                    if team {
                        let view = AgentView {
                            conversation: &conversation,
                            participants: &participants,
                        };
                        let data = Reply {
                            view,
                            unread_count,
                            queue,
                        };
                        FrameBuilder::success(code, user, room_id, reference.as_deref(), data)
                    } else {
                        let view = CustomerView::of(&conversation);
                        let data = Reply {
                            view,
                            unread_count,
                            queue,
                        };
                        FrameBuilder::success(code, user, room_id, reference.as_deref(), data)
                    }
                }
                outcome => {
                    let error = match outcome {
                        Ok(_) => ProtocolError::new(ErrorCode::NotFound, "not a conversation"),
                        Err(_) => storage_unavailable(),
                    };
                    shared.metrics.error(error.code);
                    FrameBuilder::error(
                        Code::ConversationGet.response(),
                        Some(&conn.claims.sub),
                        Some(&room.room_id),
                        reference.as_deref(),
                        &error,
                    )
                }
            };
            shared
                .metrics
                .frames_out(OutCode::Response(Code::ConversationGet), 1);
            Route::new(&shared.shards, here).send(&conn, frame, FrameClass::Durable);
            drop(permit);
        });
    }
}
