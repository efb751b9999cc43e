//! `read_receipt`: move the user's read marker in a room forward to a message.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use storage::{Direction, RoomKey, Store, Timestamp};

use super::{check_sender, parse_data, Code, RoomCall};
use crate::codec::{ErrorCode, FrameBuilder, ProtocolError};
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::shard::{server_busy, storage_unavailable, ConnRef, Route, Shard, ShardEvent, Slot};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReceipt {
    pub message_id: String,
}

#[derive(Deserialize)]
struct ReadReceiptData {
    message_id: String,
    sender: String,
}

impl ReadReceipt {
    pub fn parse(data: &RawValue, user_id: &str) -> Result<ReadReceipt, ProtocolError> {
        let d: ReadReceiptData = parse_data(data)?;
        check_sender(&d.sender, user_id)?;
        if d.message_id.is_empty() || d.message_id.len() > super::chat::MAX_MESSAGE_ID_BYTES {
            return Err(ProtocolError::bad_request(
                "message_id must be 1 to 64 bytes",
            ));
        }
        Ok(ReadReceipt {
            message_id: d.message_id,
        })
    }
}

impl Shard {
    /// `read_receipt`: moves the user's read marker (never backwards) in a helper task, answers
    /// with the marker and the unread count, and tells the room when the marker moved to
    /// the message ([`Shard::receipt_stored`]).
    pub(crate) fn read_receipt(&mut self, call: RoomCall, receipt: ReadReceipt) {
        let RoomCall {
            conn,
            room: room_id,
            reference,
            ..
        } = call;
        let message_id = receipt.message_id;
        let Some(permit) = self.try_work() else {
            let error = server_busy();
            return self.reply_error(
                &conn,
                Code::ReadReceipt,
                &room_id,
                reference.as_deref(),
                error,
            );
        };
        let store = self.shared.store.clone();
        let events = self.events_tx.clone();
        let (shared, here) = (self.shared.clone(), self.index);
        let metrics = self.shared.metrics.clone();
        tokio::spawn(async move {
            let fail = |error: ProtocolError| {
                metrics.error(error.code);
                metrics.frames_out(OutCode::Response(Code::ReadReceipt), 1);
                let frame = FrameBuilder::error(
                    Code::ReadReceipt.response(),
                    Some(&conn.claims.sub),
                    Some(&room_id.room_id),
                    reference.as_deref(),
                    &error,
                );
                Route::new(&shared.shards, here).send(&conn, frame, FrameClass::Durable);
            };
            let message = match store.message_by_id(&room_id, &message_id).await {
                Ok(Some(m)) if m.direction != Direction::Note || conn.claims.role.sees_notes() => m,
                Ok(_) => {
                    return fail(ProtocolError::new(
                        ErrorCode::NotFound,
                        "message not found in this room",
                    ))
                }
                Err(_) => return fail(storage_unavailable()),
            };
            let Ok(state) = store
                .mark_read(&room_id, &conn.claims.sub, message.seq)
                .await
            else {
                return fail(storage_unavailable());
            };
            let marker = state.read_seq;
            let unread = Some(state.unread_for(conn.claims.role.sees_notes()));
            let read_at = Timestamp::now();
            let data = ReceiptReply {
                message_id: &message.message_id,
                seq: message.seq,
                sender: &conn.claims.sub,
                read_at,
                read_seq: Some(marker),
                unread_count: unread,
            };
            metrics.frames_out(OutCode::Response(Code::ReadReceipt), 1);
            let direct = FrameBuilder::success(
                Code::ReadReceipt.response(),
                &conn.claims.sub,
                Some(&room_id.room_id),
                reference.as_deref(),
                data,
            );
            Route::new(&shared.shards, here).send(&conn, direct, FrameClass::Durable);
            // Others hear about it only when the marker moved to this message.
            let broadcast = (marker == message.seq).then(|| {
                FrameBuilder::success(
                    Code::ReadReceipt.response(),
                    &conn.claims.sub,
                    Some(&room_id.room_id),
                    None,
                    ReceiptReply {
                        read_seq: None,
                        unread_count: None,
                        ..data
                    },
                )
            });
            let _ = events
                .send(ShardEvent::ReceiptStored {
                    room_id,
                    conn,
                    broadcast,
                    team_only: message.direction == Direction::Note,
                    seq: message.seq,
                })
                .await;
            drop(permit);
        });
    }

    /// A read receipt is stored: the room's other members hear of it (team members only, when
    /// the message is a note).
    pub(crate) fn receipt_stored(
        &mut self,
        room_id: RoomKey,
        conn: ConnRef,
        broadcast: Option<Bytes>,
        team_only: bool,
        seq: u64,
    ) {
        self.conversation_seen(&room_id, &conn, seq);
        if let (Some(frame), Some(Slot::Ready(state))) = (broadcast, self.rooms.get_mut(&room_id)) {
            let route = Route::new(&self.shared.shards, self.index);
            let members = state.members.values_mut().filter(|member| {
                member.conn.id != conn.id && (!team_only || member.conn.claims.role.sees_notes())
            });
            let n = route.broadcast(&mut self.lists, members, &frame, FrameClass::Durable);
            self.shared
                .metrics
                .frames_out(OutCode::Response(Code::ReadReceipt), n);
        }
    }
}

#[derive(Serialize, Clone, Copy)]
struct ReceiptReply<'a> {
    message_id: &'a str,
    seq: u64,
    sender: &'a str,
    read_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unread_count: Option<u64>,
}
