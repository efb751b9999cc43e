//! Shared fixtures for the hot-path benchmarks in `benches/`: a typical client chat frame, the
//! stored message a `chat_response` carries, and outboxes wired to throwaway counters the way the
//! gateway's own unit tests build them.
//!
//! # Layout
//!
//! - `benches/codec.rs`: envelope + command parse, reply frame serialize.
//! - `benches/fanout.rs`: one shared frame pushed to N connection outboxes.
//! - `benches/group_commit.rs`: concurrent appends against the SQLite group-commit writer.
//!
//! # Example
//!
//! ```
//! use gateway::cmd::{Code, Command};
//! let frame = bench::chat_frame(bench::CHAT_FRAME_LEN);
//! assert_eq!(frame.len(), bench::CHAT_FRAME_LEN);
//! let envelope = gateway::codec::parse_envelope(&frame).unwrap();
//! let code = Code::parse(&envelope.code).unwrap();
//! let command = Command::parse(code, envelope.data, &envelope.user_id).unwrap();
//! assert!(matches!(command, Command::Chat(_)));
//! ```

use std::sync::Arc;

use gateway::outbox::{Bound, Frames, Outbox, OutboxMetrics, Taken, Written};
use prometheus::{IntCounter, IntGauge};
use storage::{Message, NewMessage, RoomKey, Timestamp};

/// The user every fixture speaks for.
pub const USER: &str = "u1";
/// The room every fixture talks in.
pub const ROOM: &str = "r1";
/// The tenant owning [`ROOM`].
pub const TENANT: &str = "acme";
/// The client's correlation reference.
pub const REFERENCE: &str = "c1";
/// Size of a typical client chat frame, in bytes: a short line with its envelope.
pub const CHAT_FRAME_LEN: usize = 100;
/// Size of [`chat_frame`] with no message text: the envelope, `data` and `sender`.
pub const CHAT_FRAME_OVERHEAD: usize = 92;
/// Length of the text in [`chat_message`], in bytes.
pub const MESSAGE_TEXT_LEN: usize = 100;
/// Per-connection outbound queue bound: the gateway's default `--outbound-queue`.
pub const OUTBOUND_QUEUE: usize = 1024;
/// The gateway's default outbound queue bound in bytes.
pub const OUTBOUND_QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// ASCII filler text of exactly `len` bytes.
pub fn text(len: usize) -> String {
    "lorem ipsum dolor sit amet, consectetur adipiscing elit "
        .chars()
        .cycle()
        .take(len)
        .collect()
}

/// A client `chat` frame (with `room_id` and `ref`) of exactly `len` bytes: the message text
/// fills what the envelope leaves.
///
/// # Panics
///
/// When `len` is smaller than [`CHAT_FRAME_OVERHEAD`].
pub fn chat_frame(len: usize) -> Vec<u8> {
    assert!(
        len >= CHAT_FRAME_OVERHEAD,
        "a chat frame needs {CHAT_FRAME_OVERHEAD} bytes"
    );
    let message = text(len - CHAT_FRAME_OVERHEAD);
    let frame = format!(
        r#"{{"code":"chat","user_id":"{USER}","room_id":"{ROOM}","ref":"{REFERENCE}","data":{{"message":"{message}","sender":"{USER}"}}}}"#
    );
    assert_eq!(frame.len(), len, "CHAT_FRAME_OVERHEAD is out of date");
    frame.into_bytes()
}

/// A stored message with a [`MESSAGE_TEXT_LEN`]-byte text, as a `chat_response` carries it.
pub fn chat_message() -> Message {
    let mut message = NewMessage::text(
        &RoomKey::new(TENANT, ROOM),
        17,
        USER,
        &text(MESSAGE_TEXT_LEN),
    );
    message.message_id = "01HZX3J8Q6S9V2C4T7W0Y5B1ND".to_owned();
    message.created_at = Timestamp(1_700_000_000_000);
    message.into_message()
}

/// Counters shared by every outbox, not registered anywhere.
pub fn outbox_metrics() -> Arc<OutboxMetrics> {
    Arc::new(OutboxMetrics {
        drops: IntCounter::new("outbound_drops", "dropped frames").expect("valid counter"),
        slow_consumer_closes: IntCounter::new("slow_consumer_closes", "slow consumers")
            .expect("valid counter"),
        closes_1013: IntCounter::new("closes_1013", "1013 closes").expect("valid counter"),
        high_water: IntGauge::new("outbound_high_water", "deepest queue").expect("valid gauge"),
        high_water_bytes: IntGauge::new("outbound_high_water_bytes", "biggest queue")
            .expect("valid gauge"),
    })
}

/// `n` outboxes with the default bound, sharing `metrics` as the gateway's connections do.
pub fn outboxes(n: usize, metrics: &Arc<OutboxMetrics>) -> Vec<Outbox> {
    (0..n)
        .map(|_| {
            Outbox::new(
                Bound {
                    frames: OUTBOUND_QUEUE,
                    bytes: OUTBOUND_QUEUE_BYTES,
                },
                metrics.clone(),
            )
        })
        .collect()
}

/// Moves everything queued in `outbox` to the back of `batch` and reports it written, as the
/// connection does around a write that the socket takes whole.
pub fn drain(outbox: &Outbox, batch: &mut Frames) {
    let before = batch.len();
    let taken = outbox.take(batch, Written::default());
    debug_assert!(
        !matches!(taken, Taken::Close(_)),
        "a bench outbox never closes"
    );
    outbox.written(Written {
        frames: batch.len() - before,
        bytes: batch
            .iter()
            .skip(before)
            .map(|(frame, _)| frame.len())
            .sum(),
    });
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use gateway::cmd::{Code, Command};
    use gateway::codec::ws::payload_of;
    use gateway::codec::{parse_envelope, FrameBuilder};
    use gateway::outbox::{FrameClass, Pushed};

    use super::*;

    #[test]
    fn chat_frames_are_valid_chats_of_the_requested_size() {
        for len in [CHAT_FRAME_LEN, 1000] {
            let frame = chat_frame(len);
            assert_eq!(frame.len(), len);
            let envelope = parse_envelope(&frame).unwrap();
            assert_eq!(envelope.reference.as_deref(), Some(REFERENCE));
            let code = Code::parse(&envelope.code).unwrap();
            let command = Command::parse(code, envelope.data, &envelope.user_id).unwrap();
            let Command::Chat(chat) = command else {
                panic!("not a chat command");
            };
            assert_eq!(chat.message.len(), len - CHAT_FRAME_OVERHEAD);
        }
    }

    #[test]
    fn chat_response_carries_the_full_text() {
        let message = chat_message();
        assert_eq!(message.message.len(), MESSAGE_TEXT_LEN);
        let frame = FrameBuilder::success(
            Code::Chat.response(),
            USER,
            Some(ROOM),
            Some(REFERENCE),
            &message,
        );
        let v: serde_json::Value = serde_json::from_slice(payload_of(&frame)).unwrap();
        assert_eq!(v["data"]["message"], message.message.as_str());
    }

    #[test]
    fn drain_empties_the_queue() {
        let metrics = outbox_metrics();
        let boxes = outboxes(3, &metrics);
        let frame = Bytes::from_static(b"x");
        for o in &boxes {
            assert_eq!(o.push(frame.clone(), FrameClass::Durable), Pushed::Queued);
            assert_eq!(o.push(frame.clone(), FrameClass::Durable), Pushed::Queued);
        }
        let mut batch = Frames::new();
        for o in &boxes {
            drain(o, &mut batch);
            assert!(o.is_empty());
        }
        assert_eq!(batch.len(), 6);
        drain(&boxes[0], &mut batch);
        assert_eq!(batch.len(), 6);
    }
}
