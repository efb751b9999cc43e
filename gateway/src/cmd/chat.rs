//! `chat`: a message to store durably and fan out to the room.

use std::time::Instant;

use bytes::Bytes;

use serde::Deserialize;
use serde_json::value::RawValue;
use storage::records::{DeliveryMarks, MessageDelivery};
use storage::{Appended, Direction, MessageType, NewMessage, RoomKey, RoomKind, Timestamp};

use super::{check_sender, content, mark_mine, marks_mine, parse_data, Code, Posted, RoomCall};
use crate::auth::{may_join, Role};
use crate::codec::{ErrorCode, FrameBuilder, ProtocolError};
use crate::delivery::{mark_delivery, side_of};
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::shard::{access_error, AppendContext, ConnRef, Member, Route, Shard, Slot};

/// Longest client-chosen `message_id`, in bytes.
pub const MAX_MESSAGE_ID_BYTES: usize = 64;
/// Longest message text, in bytes.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Largest `metadata` object, serialized.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct Chat {
    pub message: String,
    pub message_id: Option<String>,
    pub attached_files: Vec<String>,
    pub reply_to: Option<String>,
    pub kind: MessageType,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct ChatData {
    message: String,
    sender: String,
    message_id: Option<String>,
    #[serde(default)]
    attached_files: Vec<String>,
    reply_to: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Chat {
    pub fn parse(data: &RawValue, user_id: &str) -> Result<Chat, ProtocolError> {
        let d: ChatData = parse_data(data)?;
        check_sender(&d.sender, user_id)?;
        if let Some(id) = &d.message_id {
            if id.is_empty() || id.len() > MAX_MESSAGE_ID_BYTES {
                return Err(ProtocolError::bad_request(
                    "message_id must be 1 to 64 bytes",
                ));
            }
        }
        if d.message.len() > MAX_TEXT_BYTES {
            return Err(ProtocolError::new(
                ErrorCode::TooLarge,
                "message is longer than 16384 bytes",
            ));
        }
        let metadata = d.metadata.unwrap_or_default();
        if !metadata.is_empty()
            && serde_json::to_vec(&metadata).map_or(0, |v| v.len()) > MAX_METADATA_BYTES
        {
            return Err(ProtocolError::new(
                ErrorCode::TooLarge,
                "metadata is larger than 8192 bytes",
            ));
        }
        let kind = content::check(d.kind.as_deref(), &d.message, &d.attached_files, &metadata)?;
        Ok(Chat {
            message: d.message,
            message_id: d.message_id,
            attached_files: d.attached_files,
            reply_to: d.reply_to,
            kind,
            metadata,
        })
    }
}

impl Shard {
    /// `chat`: builds the message and hands it to the room's sequencing
    /// ([`Shard::start_append`]), which numbers it and stores it; [`Shard::answer_chat`]
    /// answers it then.
    pub(crate) fn chat(&mut self, call: RoomCall, chat: Chat) {
        let RoomCall {
            conn,
            room: room_id,
            reference,
            received,
        } = call;
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&room_id) else {
            return;
        };
        let direction = match (state.room.kind, conn.claims.role) {
            (RoomKind::Team, _) => Direction::Internal,
            (_, Role::Customer) => Direction::Incoming,
            _ => Direction::Outgoing,
        };
        // The id goes back in an error reply, so the client can retry with it (and the shard
        // can recognise a retry of a write whose outcome was unknown).
        let message_id = chat
            .message_id
            .unwrap_or_else(|| ulid::Ulid::new().to_string());
        let message = NewMessage {
            message_id,
            // Numbered when it is sent (below, or when held, once the room has renumbered).
            seq: 0,
            tenant_id: room_id.tenant_id.clone(),
            room_id: room_id.room_id.clone(),
            sender: conn.claims.sub.clone(),
            sender_type: conn.claims.role.sender_type(),
            direction,
            kind: chat.kind,
            message: chat.message,
            attached_files: chat.attached_files,
            reply_to: chat.reply_to,
            mentions: Vec::new(),
            metadata: chat.metadata,
            created_at: Timestamp::now(),
        };
        self.start_append(AppendContext {
            code: Code::Chat,
            room_id,
            conn,
            reference,
            received,
            message,
            attempts: 0,
            unnumbered: false,
            id_checked: false,
        });
    }

    /// A message posted over the HTTP API: `join`'s access rule instead of a membership, then
    /// the same path as a member's `chat` or `note`.
    pub(crate) fn post(&mut self, call: RoomCall, posted: Posted) {
        let Some(Slot::Ready(state)) = self.rooms.get(&call.room) else {
            return;
        };
        let refusal = access_error(may_join(&call.conn.claims, &state.room)).or_else(|| {
            let note_by_customer =
                matches!(posted, Posted::Note(_)) && !call.conn.claims.role.sees_notes();
            note_by_customer.then(|| {
                ProtocolError::new(ErrorCode::Forbidden, "only agents and admins write notes")
            })
        });
        if let Some(error) = refusal {
            let code = match posted {
                Posted::Chat(_) => Code::Chat,
                Posted::Note(_) => Code::Note,
            };
            return self.refuse(call, code, error);
        }
        match posted {
            Posted::Chat(chat) => self.chat(call, chat),
            Posted::Note(note) => self.note(call, note),
        }
    }

    /// Answers a stored message (a `chat`, or a `note`: `code`) once the store has (after any
    /// renumbering): the reply to the sender and, for a new message, the event to the room's
    /// other members (team members only for a note), then a note's mentions.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn answer_stored(
        &mut self,
        code: Code,
        room_id: RoomKey,
        conn: ConnRef,
        reference: Option<String>,
        received: Instant,
        message_id: String,
        result: storage::Result<Appended>,
    ) {
        let appended = match result {
            Ok(appended) => appended,
            Err(e) => {
                tracing::warn!(room_id = %room_id.room_id, error = %e, "storing a chat message failed");
                let error = match e {
                    storage::Error::Invalid(m) => ProtocolError::new(ErrorCode::BadRequest, m),
                    storage::Error::OutcomeUnknown(_) => ProtocolError::new(
                        ErrorCode::Unavailable,
                        "message outcome unknown: storage did not confirm it in time, retry with the same message_id",
                    )
                    .with_message_id(Some(message_id)),
                    _ => ProtocolError::new(
                        ErrorCode::Unavailable,
                        "message not accepted: storage unavailable, retry with the same message_id",
                    )
                    .with_message_id(Some(message_id)),
                };
                self.reply_error(&conn, code, &room_id, reference.as_deref(), error);
                self.maybe_unload(&room_id);
                return;
            }
        };
        // A duplicate from someone else (or of a message the sender may not see) is not a
        // retry: answering with the stored message would hand out another user's message.
        if appended.duplicate
            && (appended.message.sender != conn.claims.sub
                || (appended.message.direction == Direction::Note
                    && !conn.claims.role.sees_notes()))
        {
            let error = ProtocolError::new(
                ErrorCode::BadRequest,
                "message_id is already used by another message in this room",
            );
            self.reply_error(&conn, code, &room_id, reference.as_deref(), error);
            return self.maybe_unload(&room_id);
        }
        let metrics = &self.shared.metrics;
        // The reply and the room's event carry the same message: it is serialized once and
        // copied into both frames (they differ only in `ref`).
        // (Serializing a stored message cannot fail: its maps have string keys.)
        let mut message_json: Box<RawValue> =
            serde_json::value::to_raw_value(&appended.message).unwrap_or_default();
        let now = Timestamp::now();
        let direct = |message_json: &RawValue| {
            let mine;
            let data = if marks_mine(conn.claims.role) {
                mine = customer_json(message_json, true);
                &*mine
            } else {
                message_json
            };
            FrameBuilder::success_raw(
                code.response(),
                &conn.claims.sub,
                Some(&room_id.room_id),
                reference.as_deref(),
                now,
                data,
            )
        };
        let route = Route::new(&self.shared.shards, self.index);
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&room_id) else {
            route.send(&conn, direct(&message_json), FrameClass::Durable);
            metrics.frames_out(OutCode::Response(code), 1);
            return;
        };
        // Once stored, the id's outcome is known, duplicate or not.
        let was_unknown = match state
            .unknown_outcomes
            .iter()
            .position(|id| *id == message_id)
        {
            Some(at) => {
                state.unknown_outcomes.remove(at);
                true
            }
            None => false,
        };
        // A duplicate is news to the room only when it is the retry of a write whose outcome
        // was unknown: the original was never announced. Members that joined after it was
        // stored have it already (in `missed`, or behind their starting point).
        let seq = appended.message.seq;
        // A team room has no conversation: its chats skip the inbox's bookkeeping (and the
        // room lookup it starts with).
        let conversation = state.room.kind != RoomKind::Team;
        let announce = !appended.duplicate || was_unknown;
        if conversation {
            let direction = appended.message.direction;
            if let Some(for_team) = DeliveryMarks::for_team(direction) {
                // Delivered at once when a connection of the side it is for gets it now.
                let live = announce
                    && state.members.values().any(|member| {
                        member.conn.id != conn.id
                            && (!appended.duplicate || member.joined_at_seq < seq)
                            && side_of(member.conn.claims.role) == Some(for_team)
                    });
                if live && state.delivery.side(for_team).delivered(seq) {
                    state.activity.delivery.side(for_team).delivered(seq);
                }
                if let Some(delivery) = state.delivery.state_of(direction, seq) {
                    message_json = with_delivery(&message_json, delivery);
                }
            }
        }
        let direct = direct(&message_json);
        if announce {
            state.room.last_seq = state.room.last_seq.max(appended.message.seq);
            let event = FrameBuilder::success_raw(
                code.response(),
                &conn.claims.sub,
                Some(&room_id.room_id),
                None,
                now,
                &message_json,
            );
            let customer_hidden = appended.message.direction == Direction::Note;
            let receives = |member: &Member| {
                member.conn.id != conn.id
                    && (!customer_hidden || member.conn.claims.role.sees_notes())
                    && (!appended.duplicate || member.joined_at_seq < seq)
            };
            // Customers get the message with `is_mine`: a frame of their own, after the
            // one frame everybody else shares.
            let mut customers = 0;
            let members = state.members.values_mut().filter(|member| {
                if conversation && marks_mine(member.conn.claims.role) {
                    customers += 1;
                    return false;
                }
                receives(member)
            });
            let mut n = route.broadcast(&mut self.lists, members, &event, FrameClass::Durable);
            if customers > 0 {
                let sender = &appended.message.sender;
                let mut frames: [Option<Bytes>; 2] = [None, None];
                for member in state.members.values_mut() {
                    if !marks_mine(member.conn.claims.role) || !receives(member) {
                        continue;
                    }
                    let mine = member.conn.claims.sub == *sender;
                    let frame = frames[usize::from(mine)].get_or_insert_with(|| {
                        FrameBuilder::success_raw(
                            code.response(),
                            &conn.claims.sub,
                            Some(&room_id.room_id),
                            None,
                            now,
                            &customer_json(&message_json, mine),
                        )
                    });
                    route.deliver(member, frame.clone(), FrameClass::Durable);
                    n += 1;
                }
            }
            metrics.frames_out(OutCode::Response(code), n + 1);
            metrics.deliveries.inc_by(n);
        } else {
            metrics.frames_out(OutCode::Response(code), 1);
        }
        // The direct reply answers a request read before any join still being prepared for this
        // connection, so it goes out now rather than behind that join's reply (and is never
        // dropped with it when that join fails).
        route.send(&conn, direct, FrameClass::Durable);
        metrics
            .fanout_latency
            .observe(received.elapsed().as_secs_f64());
        if announce {
            if let Some(Slot::Ready(state)) = self.rooms.get(&room_id) {
                self.shared.integration.message_stored(
                    self.index,
                    &room_id,
                    state.room.kind,
                    &appended.message,
                    &state.room.participants,
                );
            }
            if !appended.message.mentions.is_empty() {
                self.notify_mentions(&room_id, &appended.message);
            }
            if conversation {
                self.conversation_activity(&room_id, &appended.message);
            }
        }
        self.maybe_unload(&room_id);
    }
}

/// A serialized message with its `delivery` state.
fn with_delivery(message_json: &RawValue, delivery: MessageDelivery) -> Box<RawValue> {
    amended(message_json, |json| mark_delivery(json, delivery))
}

/// A serialized message with the customer's `is_mine`.
fn customer_json(message_json: &RawValue, mine: bool) -> Box<RawValue> {
    amended(message_json, |json| mark_mine(json, mine))
}

/// A copy of a serialized message with a field appended by `append`.
fn amended(message_json: &RawValue, append: impl FnOnce(&mut Vec<u8>)) -> Box<RawValue> {
    let mut json = message_json.get().as_bytes().to_vec();
    append(&mut json);
    let json = String::from_utf8(json).unwrap_or_default();
    RawValue::from_string(json).unwrap_or_else(|_| message_json.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Chat, ProtocolError> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        Chat::parse(&raw, "u1")
    }

    #[test]
    fn validates_chat_data() {
        assert!(parse(r#"{"message":"hi","sender":"u1"}"#).is_ok());
        assert_eq!(
            parse(r#"{"message":"hi","sender":"u2"}"#).unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert_eq!(
            parse(r#"{"message":"","sender":"u1"}"#).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert!(parse(r#"{"message":"","sender":"u1","attached_files":["a.png"]}"#).is_ok());
        assert_eq!(
            parse(r#"{"message":"hi","sender":"u1","type":"gif"}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            parse(r#"{"message":5,"sender":"u1"}"#).unwrap_err().code,
            ErrorCode::BadRequest
        );
        let long = format!(
            r#"{{"message":"{}","sender":"u1"}}"#,
            "a".repeat(MAX_TEXT_BYTES + 1)
        );
        assert_eq!(parse(&long).unwrap_err().code, ErrorCode::TooLarge);
    }
}
