//! One WebSocket connection: the reader (frames in, checks, dispatch to room shards), the
//! writer (everything queued, written in batches) and the heartbeat. The connection owns its
//! socket and buffers and nothing else; room state lives in the shards.
//!
//! fastwebsockets performs the upgrade; frames are then read with the codec's sans-io decoder
//! ([`crate::codec::ws`]) rather than fastwebsockets' reader, which keeps an 8 KiB buffer per
//! connection for its whole life. Here the read buffer exists only while bytes are pending, so
//! an idle connection holds none (14.2 KiB → 5.3 KiB per idle connection, measured with
//! `loadgen connections`); the Autobahn suite runs against this path.

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::auth::{now_secs, Claims};
use crate::cmd::{Code, Command};
use crate::codec::reply::response_code;
use crate::codec::ws::{self, CloseWith, OpCode};
use crate::codec::{parse_envelope, ErrorCode, FrameBuilder, ProtocolError};
use crate::metrics::OutCode;
use crate::outbox::{FrameClass, Outbox, OutboxMetrics};
use crate::presence::UserKey;
use crate::server::Shared;
use crate::shard::{self, presence_frame, ConnId, ConnRef, RoomAction, RoomRequest, ShardCommand};

/// How long a closing connection waits for the peer's close frame before dropping the socket.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// About the most bytes handed to the kernel in one write of queued frames.
const MAX_WRITE_BYTES: usize = 256 * 1024;
/// Most frames in one vectored write (Linux's `IOV_MAX` is 1024).
const MAX_IOV: usize = 256;
/// Most rooms one connection may be joined to.
const MAX_JOINED_ROOMS: usize = 10_000;
/// Size of the read buffer allocated when bytes arrive (it is released once they are handled).
const READ_CHUNK: usize = 16 * 1024;

/// What the connection serves.
pub enum Mode {
    /// The coded JSON protocol for an authenticated session.
    Protocol(Arc<Claims>),
    /// Echo every message back (Autobahn conformance route).
    Echo,
}

/// Turns a finished HTTP upgrade into the raw socket halves, plus the bytes hyper already read
/// past the handshake (usually none).
fn into_socket(upgraded: Upgraded) -> Option<(OwnedReadHalf, OwnedWriteHalf, BytesMut)> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    let (read, write) = parts.io.into_inner().into_split();
    // Copy rather than keep a slice: a slice would hold hyper's whole read buffer for the life
    // of the connection.
    let leftover = BytesMut::from(&parts.read_buf[..]);
    Some((read, write, leftover))
}

/// Reads client frames off the socket. Its buffer exists only while bytes are pending: it is
/// allocated when the socket turns readable and released once every complete frame in it has
/// been handed out, so an idle connection holds no read buffer at all. Frame payloads are split
/// off the buffer and unmasked in place, without a copy.
struct FrameReader {
    socket: OwnedReadHalf,
    buf: BytesMut,
    max_payload: usize,
}

impl FrameReader {
    /// The next complete frame already buffered; `Ok(None)` when more bytes are needed.
    fn next_frame(&mut self) -> Result<Option<(ws::ClientHead, Bytes)>, CloseWith> {
        let Some(head) = ws::decode_head(&self.buf, self.max_payload)? else {
            return Ok(None);
        };
        if self.buf.len() < head.frame_len() {
            // The header passed the size limit: make room for the rest of this frame at once.
            self.buf.reserve(head.frame_len() - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(head.frame_len());
        frame.advance(head.header_len);
        ws::unmask(&mut frame, head.mask);
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        Ok(Some((head, frame.freeze())))
    }

    /// Reads what the socket holds once it is readable; `Ok(false)` at end of stream.
    fn fill(&mut self) -> std::io::Result<bool> {
        if self.buf.capacity() == self.buf.len() {
            self.buf.reserve(READ_CHUNK);
        }
        match self.socket.try_read_buf(&mut self.buf) {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }
}

/// A token bucket for per-connection rate limits.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Reassembles fragmented messages under the size limit, validating UTF-8 as it goes so an
/// invalid text message fails on the first bad fragment.
struct Assembler {
    max: usize,
    opcode: Option<OpCode>,
    buf: Vec<u8>,
    valid_up_to: usize,
}

impl Assembler {
    fn new(max: usize) -> Self {
        Assembler {
            max,
            opcode: None,
            buf: Vec::new(),
            valid_up_to: 0,
        }
    }

    fn check_utf8(&mut self, fin: bool) -> Result<(), CloseWith> {
        match std::str::from_utf8(&self.buf[self.valid_up_to..]) {
            Ok(_) => self.valid_up_to = self.buf.len(),
            Err(e) if e.error_len().is_none() && !fin => self.valid_up_to += e.valid_up_to(),
            Err(_) => return Err((1007, "invalid utf-8 in text message")),
        }
        Ok(())
    }

    /// Feeds one data frame; returns a complete message when one is ready.
    fn push(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: Bytes,
    ) -> Result<Option<(OpCode, Bytes)>, CloseWith> {
        match (opcode, self.opcode) {
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err((1002, "new message inside a fragmented message"))
            }
            (OpCode::Continuation, None) => return Err((1002, "continuation without a message")),
            (OpCode::Text | OpCode::Binary, None) if fin => {
                // The common case: a whole message in one frame, handed on without a copy.
                if opcode == OpCode::Text && std::str::from_utf8(&payload).is_err() {
                    return Err((1007, "invalid utf-8 in text message"));
                }
                return Ok(Some((opcode, payload)));
            }
            (OpCode::Text | OpCode::Binary, None) => {
                self.opcode = Some(opcode);
                self.buf.clear();
                self.valid_up_to = 0;
            }
            _ => {}
        }
        if self.buf.len() + payload.len() > self.max {
            return Err((1009, "message too big"));
        }
        self.buf.extend_from_slice(&payload);
        let message_opcode = self.opcode.expect("set above");
        if message_opcode == OpCode::Text {
            self.check_utf8(fin)?;
        }
        if !fin {
            return Ok(None);
        }
        self.opcode = None;
        let message = Bytes::from(std::mem::take(&mut self.buf));
        Ok(Some((message_opcode, message)))
    }
}

/// Writes everything the outbox hands over, in as few syscalls as possible, until a close.
async fn write_loop(outbox: Arc<Outbox>, mut socket: OwnedWriteHalf, timeout: Duration) {
    // Allocated on first use, so an idle connection's writer holds no buffer.
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        let close = outbox.next_batch(&mut batch).await;
        let result = write_frames(&mut socket, &batch, timeout).await;
        batch.clear();
        if result.is_err() {
            // Peer gone or not reading at all: nothing more can be delivered.
            outbox.close(1006, "write failed");
            return;
        }
        if let Some(close) = close {
            let frame = close
                .frame
                .unwrap_or_else(|| ws::close_frame(close.code, &close.reason));
            let _ = tokio::time::timeout(timeout, socket.write_all(&frame)).await;
            let _ = socket.shutdown().await;
            return;
        }
    }
}

/// Writes the frames in order with vectored writes straight from the shared frame buffers (no
/// copy into a staging buffer): up to `MAX_IOV` frames or about `MAX_WRITE_BYTES` per syscall,
/// each given `timeout` to make progress.
async fn write_frames(
    socket: &mut OwnedWriteHalf,
    frames: &[Bytes],
    timeout: Duration,
) -> std::io::Result<()> {
    // The first frame not yet fully written, and how much of it is.
    let (mut index, mut offset) = (0, 0);
    loop {
        while index < frames.len() && offset == frames[index].len() {
            index += 1;
            offset = 0;
        }
        if index == frames.len() {
            return Ok(());
        }
        // On the heap: an array here would sit in every connection's writer future.
        let mut slices = Vec::with_capacity((frames.len() - index).min(MAX_IOV));
        slices.push(IoSlice::new(&frames[index][offset..]));
        let mut bytes = slices[0].len();
        for frame in &frames[index + 1..] {
            if slices.len() == MAX_IOV || bytes >= MAX_WRITE_BYTES {
                break;
            }
            slices.push(IoSlice::new(frame));
            bytes += frame.len();
        }
        let mut written = tokio::time::timeout(timeout, socket.write_vectored(&slices))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let rest = frames[index].len() - offset;
            if written < rest {
                offset += written;
                break;
            }
            written -= rest;
            index += 1;
            offset = 0;
        }
    }
}

#[derive(Serialize)]
struct ConnectedData<'a> {
    session_id: &'a str,
    tenant_id: &'a str,
    heartbeat_ms: u64,
}

#[derive(Serialize)]
struct PingData {
    timestamp: storage::Timestamp,
}

/// The protocol side of a session: checks and dispatch.
struct Session {
    shared: Arc<Shared>,
    conn: ConnRef,
    user_key: UserKey,
    /// Rooms this connection joined, with their shard.
    joined: HashMap<String, usize>,
    requests: TokenBucket,
    typing: TokenBucket,
}

impl Session {
    fn error(
        &self,
        code: &str,
        room_id: Option<&str>,
        reference: Option<&str>,
        error: &ProtocolError,
    ) {
        self.shared.metrics.error(error.code);
        self.shared
            .metrics
            .frames_out(OutCode::Error, u64::from(code == "error"));
        let frame =
            FrameBuilder::error(code, Some(&self.conn.claims.sub), room_id, reference, error);
        self.conn.outbox.push(frame, FrameClass::Durable);
    }

    /// Checks and parses one text message. Whatever the connection can answer itself is
    /// answered here; a room request comes back with the index of the shard that owns the room.
    fn on_text(&mut self, payload: &[u8], received: Instant) -> Option<(usize, ShardCommand)> {
        let envelope = match parse_envelope(payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                self.shared
                    .metrics
                    .frame_in(e.code.as_deref().and_then(Code::parse));
                let code = e
                    .code
                    .as_deref()
                    .map_or_else(|| "error".to_owned(), response_code);
                self.error(
                    &code,
                    e.room_id.as_deref(),
                    e.reference.as_deref(),
                    &e.error,
                );
                return None;
            }
        };
        let reference_owned = envelope.reference.map(|r| r.into_owned());
        let room_owned = envelope.room_id.map(|r| r.into_owned());
        let reference = reference_owned.as_deref();
        let room_id = room_owned.as_deref();
        let Some(code) = Code::parse(&envelope.code) else {
            self.shared.metrics.frame_in(None);
            let error = ProtocolError::new(
                ErrorCode::UnknownCode,
                format!("unknown code {:?}", envelope.code),
            );
            self.error(&response_code(&envelope.code), room_id, reference, &error);
            return None;
        };
        self.shared.metrics.frame_in(Some(code));
        if !self.requests.take(received) {
            let error = ProtocolError::new(ErrorCode::RateLimited, "too many requests, slow down");
            self.error(code.response(), room_id, reference, &error);
            return None;
        }
        if envelope.user_id != self.conn.claims.sub {
            let error = ProtocolError::new(
                ErrorCode::Forbidden,
                "user_id must equal the token's subject",
            );
            self.error(code.response(), room_id, reference, &error);
            return None;
        }
        if code.needs_room() && room_id.is_none() {
            let error = ProtocolError::bad_request("room_id is required for this code");
            self.error(code.response(), room_id, reference, &error);
            return None;
        }
        let command = match Command::parse(code, envelope.data, &self.conn.claims.sub) {
            Ok(command) => command,
            Err(error) => {
                self.error(code.response(), room_id, reference, &error);
                return None;
            }
        };
        let action = match command {
            Command::Ping => {
                self.shared
                    .metrics
                    .frames_out(OutCode::Response(Code::Ping), 1);
                let frame = FrameBuilder::success(
                    Code::Ping.response(),
                    &self.conn.claims.sub,
                    room_owned.as_deref(),
                    reference_owned.as_deref(),
                    PingData {
                        timestamp: storage::Timestamp::now(),
                    },
                );
                self.conn.outbox.push(frame, FrameClass::Durable);
                return None;
            }
            Command::Presence(presence) => {
                if let Some(rooms) = self
                    .shared
                    .presence
                    .set_status(&self.user_key, presence.status)
                {
                    let frame = presence_frame(&self.conn.claims.sub, None, presence.status);
                    spawn_presence_broadcast(self.shared.clone(), rooms, self.conn.id, frame);
                }
                return None;
            }
            Command::Typing(typing) => {
                if !self.typing.take(received) {
                    let error =
                        ProtocolError::new(ErrorCode::RateLimited, "too many typing updates");
                    self.error(code.response(), room_id, reference, &error);
                    return None;
                }
                RoomAction::Typing(typing.status)
            }
            Command::Join(join) => RoomAction::Join(join),
            Command::Leave => RoomAction::Leave,
            Command::Chat(chat) => RoomAction::Chat(chat),
            Command::ReadReceipt(receipt) => RoomAction::ReadReceipt {
                message_id: receipt.message_id,
            },
            Command::Historic(historic) => RoomAction::Historic(historic),
        };
        let room_id = room_owned
            .clone()
            .expect("room codes carry a room_id (checked above)");
        let shard_index = shard::shard_of(&room_id, self.shared.shards.len());
        match &action {
            RoomAction::Join(_) => {
                if self.joined.len() >= MAX_JOINED_ROOMS && !self.joined.contains_key(&room_id) {
                    let error = ProtocolError::new(ErrorCode::TooLarge, "joined to too many rooms");
                    self.error(
                        code.response(),
                        Some(&room_id),
                        reference_owned.as_deref(),
                        &error,
                    );
                    return None;
                }
                self.joined.insert(room_id.clone(), shard_index);
            }
            RoomAction::Leave => {
                self.joined.remove(&room_id);
            }
            _ => {}
        }
        let request = RoomRequest {
            conn: self.conn.clone(),
            room_id,
            reference: reference_owned,
            received,
            action,
        };
        Some((shard_index, ShardCommand::Room(request)))
    }

    async fn on_close(self) {
        // Take the user's rooms before the shards forget this connection's memberships (each
        // `Disconnect` also drops the room from the user's presence entry), or a shard thread
        // that runs first leaves nobody to tell that the user went offline.
        let offline_rooms = self.shared.presence.disconnect(&self.user_key);
        let mut by_shard: HashMap<usize, Vec<String>> = HashMap::new();
        for (room, shard) in self.joined {
            by_shard.entry(shard).or_default().push(room);
        }
        for (shard, rooms) in by_shard {
            let _ = self.shared.shards[shard]
                .commands
                .send(ShardCommand::Disconnect {
                    conn: self.conn.id,
                    rooms,
                })
                .await;
        }
        if let Some(rooms) = offline_rooms {
            let frame = presence_frame(
                &self.conn.claims.sub,
                None,
                crate::cmd::presence::PresenceStatus::Offline,
            );
            spawn_presence_broadcast(self.shared.clone(), rooms, self.conn.id, frame);
        }
    }
}

/// Hands a command to a shard. The channel is bounded, so a busy shard slows this reader down
/// instead of queueing without limit; the waiting send is boxed because it is rare, and its
/// state would otherwise sit in every idle connection's future.
async fn send_to_shard(shared: &Shared, shard: usize, command: ShardCommand) {
    let commands = &shared.shards[shard].commands;
    if let Err(mpsc::error::TrySendError::Full(command)) = commands.try_send(command) {
        let _ = Box::pin(commands.send(command)).await;
    }
}

/// Sends one presence frame to every connection sharing one of `rooms`, once each.
fn spawn_presence_broadcast(shared: Arc<Shared>, rooms: Vec<String>, except: ConnId, frame: Bytes) {
    if rooms.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut by_shard: HashMap<usize, Vec<String>> = HashMap::new();
        for room in rooms {
            by_shard
                .entry(shard::shard_of(&room, shared.shards.len()))
                .or_default()
                .push(room);
        }
        let mut seen = std::collections::HashSet::new();
        let mut n = 0;
        for (shard, rooms) in by_shard {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let command = ShardCommand::CollectMembers { rooms, reply: tx };
            if shared.shards[shard].commands.send(command).await.is_err() {
                continue;
            }
            for (id, outbox) in rx.await.unwrap_or_default() {
                if id != except && seen.insert(id) {
                    outbox.push(frame.clone(), FrameClass::Ephemeral);
                    n += 1;
                }
            }
        }
        shared
            .metrics
            .frames_out(OutCode::Response(Code::Presence), n);
    });
}

/// Runs a connection to completion on the current (shard) runtime.
pub async fn run(shared: Arc<Shared>, upgraded: Upgraded, mode: Mode, shard_index: usize) {
    let Some((read, write, leftover)) = into_socket(upgraded) else {
        tracing::warn!("upgraded connection is not a tcp stream");
        return;
    };
    let config = &shared.config;
    let conn_id = shared.next_conn_id();
    let outbox = Arc::new(Outbox::new(
        config.outbound_queue,
        OutboxMetrics {
            drops: shared.metrics.outbound_drops.clone(),
            slow_consumer_closes: shared.metrics.slow_consumer_closes.clone(),
            high_water: shared.metrics.outbound_queue_high_water.clone(),
        },
    ));
    let write_timeout = Duration::from_millis(config.write_timeout_ms);
    let mut writer = tokio::spawn(write_loop(outbox.clone(), write, write_timeout));
    let connections = shared.metrics.connections[shard_index].clone();
    connections.inc();
    let _guard = shared.track_connection(outbox.clone());

    let mut session = match &mode {
        Mode::Protocol(claims) => {
            let user_key = UserKey {
                tenant: claims.tenant.clone(),
                user_id: claims.sub.clone(),
            };
            shared.presence.connect(&user_key);
            let session_id = ulid::Ulid::new().to_string();
            let frame = FrameBuilder::encode(&crate::codec::Reply {
                success: true,
                code: "connected",
                user_id: Some(&claims.sub),
                room_id: None,
                reference: None,
                timestamp: storage::Timestamp::now(),
                data: ConnectedData {
                    session_id: &session_id,
                    tenant_id: &claims.tenant,
                    heartbeat_ms: config.heartbeat_ms,
                },
            });
            shared.metrics.frames_out(OutCode::Connected, 1);
            outbox.push(frame, FrameClass::Durable);
            Some(Session {
                shared: shared.clone(),
                conn: ConnRef {
                    id: conn_id,
                    outbox: outbox.clone(),
                    claims: claims.clone(),
                },
                user_key,
                joined: HashMap::new(),
                requests: TokenBucket::new(config.rate_limit, config.rate_burst),
                typing: TokenBucket::new(config.typing_rate, config.typing_rate.saturating_mul(2)),
            })
        }
        Mode::Echo => None,
    };

    let mut reader = FrameReader {
        socket: read,
        buf: leftover,
        max_payload: config.max_message_bytes,
    };
    let mut assembler = Assembler::new(config.max_message_bytes);

    let heartbeat = Duration::from_millis(config.heartbeat_ms.max(10));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    let mut last_seen = Instant::now();
    let expiry = match &mode {
        Mode::Protocol(claims) => {
            tokio::time::Instant::now() + Duration::from_secs(claims.exp.saturating_sub(now_secs()))
        }
        Mode::Echo => tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400),
    };
    let expired = tokio::time::sleep_until(expiry);
    tokio::pin!(expired);
    let mut shutdown = shared.shutdown_signal();
    let mut closing: Option<tokio::time::Instant> = None;
    let metrics = shared.metrics.clone();
    let close = |code: u16, reason: &str| {
        metrics.close(code);
        outbox.close(code, reason);
    };

    loop {
        if closing.is_some() {
            // Past a close nothing more is handled: bytes are only drained until the peer's
            // end of stream or the linger deadline.
            reader.buf = BytesMut::new();
        }
        let next = match reader.next_frame() {
            Ok(next) => next,
            Err((code, reason)) => {
                close(code, reason);
                closing = Some(tokio::time::Instant::now() + CLOSE_LINGER);
                continue;
            }
        };
        if let Some((head, payload)) = next {
            // Every frame counts against the task's cooperative budget: a client that keeps
            // its socket full must not hold the shard's thread (rooms and other connections
            // run there too).
            tokio::task::consume_budget().await;
            last_seen = Instant::now();
            let message = match head.opcode {
                OpCode::Close => {
                    match ws::check_close_payload(&payload) {
                        // Echo the peer's close after what is queued, then stop.
                        Ok(()) => outbox.close_with_frame(ws::frame(OpCode::Close, &payload)),
                        Err((code, reason)) => close(code, reason),
                    }
                    closing = Some(tokio::time::Instant::now() + CLOSE_LINGER);
                    continue;
                }
                OpCode::Ping => {
                    outbox.push(ws::frame(OpCode::Pong, &payload), FrameClass::Ephemeral);
                    continue;
                }
                OpCode::Pong => continue,
                opcode => match assembler.push(opcode, head.fin, payload) {
                    Ok(Some(message)) => message,
                    Ok(None) => continue,
                    Err((code, reason)) => {
                        close(code, reason);
                        closing = Some(tokio::time::Instant::now() + CLOSE_LINGER);
                        continue;
                    }
                },
            };
            match (&mut session, message.0) {
                (Some(session), OpCode::Text) => {
                    if let Some((shard, command)) = session.on_text(&message.1, last_seen) {
                        send_to_shard(&shared, shard, command).await;
                    }
                }
                (Some(_), _) => {
                    close(1003, "binary frames are not accepted");
                    closing = Some(tokio::time::Instant::now() + CLOSE_LINGER);
                }
                (None, opcode) => {
                    outbox.push(ws::frame(opcode, &message.1), FrameClass::Durable);
                }
            }
            continue;
        }
        let linger = async {
            match closing {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            readable = reader.socket.readable() => {
                if !matches!(readable.and_then(|()| reader.fill()), Ok(true)) {
                    break;
                }
            }
            _ = &mut writer => break,
            _ = linger => break,
            _ = ticker.tick(), if closing.is_none() => {
                if last_seen.elapsed() >= heartbeat * 3 {
                    close(1001, "heartbeat timeout");
                    closing = Some(tokio::time::Instant::now() + CLOSE_LINGER);
                } else {
                    outbox.push(ws::frame(OpCode::Ping, b""), FrameClass::Ephemeral);
                }
            }
            _ = &mut expired, if closing.is_none() && session.is_some() => {
                if let Some(session) = &session {
                    let error = ProtocolError::new(ErrorCode::AuthError, "token expired");
                    session.error("error", None, None, &error);
                }
                close(1008, "token expired");
                closing = Some(tokio::time::Instant::now() + CLOSE_LINGER);
            }
            _ = shutdown.changed(), if closing.is_none() => {
                close(1001, "server shutting down");
                closing = Some(tokio::time::Instant::now() + CLOSE_LINGER);
            }
        }
    }

    connections.dec();
    if let Some(session) = session {
        // Boxed: the close path runs once, and keeping its state out of this future keeps
        // every idle connection smaller.
        Box::pin(session.on_close()).await;
    }
    // Let the writer finish a close in progress; it gives up on its own after the write timeout.
    if !writer.is_finished() {
        outbox.close(1001, "closing");
        let _ = tokio::time::timeout(write_timeout, &mut writer).await;
        writer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembler_enforces_size_and_utf8_across_fragments() {
        let mut a = Assembler::new(8);
        assert_eq!(
            a.push(OpCode::Text, false, Bytes::from_static(&b"abcd"[..])),
            Ok(None)
        );
        assert_eq!(
            a.push(
                OpCode::Continuation,
                false,
                Bytes::from_static(&b"efghi"[..])
            ),
            Err((1009, "message too big"))
        );
        let mut a = Assembler::new(64);
        // "é" split across two fragments is fine.
        assert_eq!(
            a.push(OpCode::Text, false, Bytes::from_static(&b"a\xc3"[..])),
            Ok(None)
        );
        let done = a
            .push(OpCode::Continuation, true, Bytes::from_static(&b"\xa9"[..]))
            .unwrap();
        assert_eq!(done.unwrap().1, Bytes::from_static("aé".as_bytes()));
        // An invalid byte fails on its fragment, before the message ends.
        assert_eq!(
            a.push(OpCode::Text, false, Bytes::from_static(&b"a\xff"[..]))
                .unwrap_err()
                .0,
            1007
        );
        let mut a = Assembler::new(64);
        assert_eq!(
            a.push(OpCode::Continuation, true, Bytes::new())
                .unwrap_err()
                .0,
            1002
        );
    }

    #[test]
    fn token_bucket_refills_over_time() {
        let mut b = TokenBucket::new(10, 2);
        let t0 = Instant::now();
        assert!(b.take(t0));
        assert!(b.take(t0));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(150)));
    }
}
