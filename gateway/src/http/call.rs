//! HTTP requests answered by the protocol's own handlers: the request becomes the code's
//! request from a connection that exists for this one call (its own outbox, no membership),
//! the room's shard runs the code exactly as for a socket (access rules, storage,
//! idempotency, fan-out to the room's sockets), and its reply frame becomes the HTTP answer.

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use storage::RoomKey;

use crate::auth::Claims;
use crate::cmd::conversation_list::ConversationList;
use crate::cmd::RoomAction;
use crate::codec::{ErrorCode, ProtocolError};
use crate::outbox::{Bound, Frames, Outbox, Written};
use crate::server::Shared;
use crate::shard::{shard_of, ConnRef, RoomRequest, ShardCommand};

/// Largest reply one call takes (a page of history is cut to `--max-reply-bytes` before this).
const REPLY_BYTES: usize = 64 * 1024 * 1024;
/// How long past the store deadline a call waits for its reply.
const REPLY_SLACK: Duration = Duration::from_secs(5);

/// The `data` of a successful reply, as the handler serialized it.
pub(crate) type Data = Box<RawValue>;

/// A connection for one HTTP call, running on `home`'s thread as far as routing goes.
fn call_conn(shared: &Shared, claims: Arc<Claims>, home: usize) -> ConnRef {
    let outbox = Outbox::new(
        Bound {
            frames: 4,
            bytes: REPLY_BYTES,
        },
        shared.outbox_metrics.clone(),
    );
    ConnRef {
        id: shared.next_conn_id(),
        home,
        outbox: Arc::new(outbox),
        claims,
    }
}

/// Runs `action` on room `room_id` of the caller's tenant and waits for its reply.
pub(crate) async fn room(
    shared: &Arc<Shared>,
    claims: Arc<Claims>,
    room_id: &str,
    action: RoomAction,
) -> Result<Data, ProtocolError> {
    let room = RoomKey::new(&claims.tenant, room_id);
    let home = shard_of(&room, shared.shards.len());
    let conn = call_conn(shared, claims, home);
    let outbox = conn.outbox.clone();
    let request = RoomRequest {
        conn,
        room,
        reference: Some("http".to_owned()),
        received: Instant::now(),
        action,
    };
    // A full shard queue is back-pressure, as for a socket: the caller retries.
    if shared.shards[home]
        .commands
        .try_send(ShardCommand::Room(request))
        .is_err()
    {
        return Err(ProtocolError::new(
            ErrorCode::Unavailable,
            "server busy, retry later",
        ));
    }
    reply(shared, &outbox).await
}

/// Runs a `conversation_list` for the caller and waits for its page.
pub(crate) async fn conversation_list(
    shared: &Arc<Shared>,
    claims: Arc<Claims>,
    list: ConversationList,
) -> Result<Data, ProtocolError> {
    let conn = call_conn(shared, claims, 0);
    let outbox = conn.outbox.clone();
    list.spawn(shared.clone(), conn, Some("http".to_owned()));
    reply(shared, &outbox).await
}

#[derive(Deserialize)]
struct Frame<'a> {
    status: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct ErrorData {
    error_code: String,
    message: String,
    message_id: Option<String>,
}

/// The first frame the call's outbox gets: its reply.
async fn reply(shared: &Shared, outbox: &Outbox) -> Result<Data, ProtocolError> {
    let mut frames = Frames::new();
    let wait = Duration::from_millis(shared.config.store_timeout_ms) + REPLY_SLACK;
    let taken = tokio::time::timeout(
        wait,
        std::future::poll_fn(
            |cx| match outbox.poll_take(cx, &mut frames, Written::default()) {
                Poll::Ready(_) => Poll::Ready(()),
                Poll::Pending => Poll::Pending,
            },
        ),
    )
    .await;
    let timed_out = || ProtocolError::new(ErrorCode::Unavailable, "no answer in time, retry later");
    taken.map_err(|_| timed_out())?;
    let (frame, _) = frames.pop_front().ok_or_else(timed_out)?;
    parse(&frame)
}

fn parse(frame: &Bytes) -> Result<Data, ProtocolError> {
    let malformed = || ProtocolError::new(ErrorCode::Unavailable, "malformed internal reply");
    // A reply is a whole WebSocket frame, as a socket's would be.
    let payload = crate::codec::ws::payload_of(frame);
    let frame: Frame<'_> = serde_json::from_slice(payload).map_err(|_| malformed())?;
    if frame.status == "success" {
        return Ok(frame.data.to_owned());
    }
    let error: ErrorData = serde_json::from_str(frame.data.get()).map_err(|_| malformed())?;
    let code = ErrorCode::ALL
        .into_iter()
        .find(|c| c.as_str() == error.error_code)
        .unwrap_or(ErrorCode::Unavailable);
    Err(ProtocolError::new(code, error.message).with_message_id(error.message_id))
}
