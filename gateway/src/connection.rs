//! One WebSocket connection in one task: frames in (checks, dispatch to room shards) and
//! everything queued for it out, in batched vectored writes. The connection owns its socket and
//! buffers and nothing else; room state lives in the shards, and heartbeats, token expiry and
//! the shutdown close come from its shard's sweep ([`crate::liveness`]).
//!
//! fastwebsockets performs the upgrade; frames are then read with the codec's sans-io decoder
//! ([`crate::codec::ws`]) rather than fastwebsockets' reader, which keeps an 8 KiB buffer per
//! connection for its whole life. Here the read buffer exists only while bytes are pending, the
//! write queue's buffer only while frames are, and reading, writing and waiting share one small
//! task, so an idle connection holds little beyond its socket (measured with
//! `loadgen connections`, see `load-tests/README.md`); the Autobahn suite runs against this path.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use storage::RoomKey;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Sleep;

use crate::auth::Claims;
use crate::cmd::presence::presence_frame;
use crate::cmd::{Code, Command};
use crate::codec::reply::response_code;
use crate::codec::ws::{self, CloseWith, OpCode};
use crate::codec::{parse_envelope, ErrorCode, FrameBuilder, ProtocolError};
use crate::limits::TokenBucket;
use crate::liveness::{self, LiveConn};
use crate::metrics::OutCode;
use crate::outbox::{clock_ms, Bound, FrameClass, Frames, Outbox, Taken, Written};
use crate::server::{ConnectionGuard, Shared};
use crate::shard::{self, ConnRef, RoomAction, RoomRequest, ShardCommand};

/// How long a closing connection may take to get its close frame written before the socket is
/// dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// After its close frame is out, how long a client that did not close first may stay silent
/// before the socket is closed (see `drain_input`).
const LINGER_QUIET: Duration = Duration::from_millis(100);
/// About the most bytes handed to the kernel in one write of queued frames.
const MAX_WRITE_BYTES: usize = 256 * 1024;
/// Most frames in one vectored write (Linux's `IOV_MAX` is 1024).
const MAX_IOV: usize = 256;
/// Most client frames handled between two write passes.
const FRAMES_PER_TURN: usize = 16;
/// Most rooms one connection may be joined to.
const MAX_JOINED_ROOMS: usize = 10_000;
/// Size of the read buffer allocated when bytes arrive (it is released once they are handled).
const READ_CHUNK: usize = 16 * 1024;
/// A write queue buffer this small is released once written out; a busy connection's bigger
/// one is kept for its next batch.
const SMALL_QUEUE: usize = 16;

/// What the connection serves.
pub enum Mode {
    /// The coded JSON protocol for an authenticated session.
    Protocol(Arc<Claims>),
    /// Echo every message back (Autobahn conformance route).
    Echo,
}

/// Turns a finished HTTP upgrade into the raw socket, plus the bytes hyper already read past
/// the handshake (usually none).
fn into_socket(upgraded: Upgraded) -> Option<(TcpStream, BytesMut)> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    // Copy rather than keep a slice: a slice would hold hyper's whole read buffer for the life
    // of the connection.
    let leftover = BytesMut::from(&parts.read_buf[..]);
    Some((parts.io.into_inner(), leftover))
}

/// Reads client frames off the socket. Its buffer exists only while bytes are pending: it is
/// allocated when the socket turns readable and released once every complete frame in it has
/// been handed out, so an idle connection holds no read buffer at all. Frame payloads are split
/// off the buffer and unmasked in place, without a copy.
struct FrameReader {
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
    fn fill(&mut self, socket: &TcpStream) -> std::io::Result<bool> {
        if self.buf.capacity() == self.buf.len() {
            self.buf.reserve(READ_CHUNK);
        }
        match socket.try_read_buf(&mut self.buf) {
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

/// Frames taken from the outbox and not yet written, in order; then, once a close is asked
/// for, the close frame.
#[derive(Default)]
struct Writer {
    frames: Frames,
    /// Bytes of the front frame already written.
    offset: usize,
    /// The close frame is queued: nothing more is taken from the outbox.
    close_queued: bool,
    /// Written since the last take: reported with the next one, when they stop counting
    /// against the connection's bound (until then the bound errs on the safe side).
    unreported: Written,
}

impl Writer {
    fn has_pending(&self) -> bool {
        !self.frames.is_empty()
    }

    /// Everything, the close frame included, is written.
    fn close_written(&self) -> bool {
        self.close_queued && self.frames.is_empty()
    }

    fn accept(&mut self, taken: Taken) {
        if let Taken::Close(close) = taken {
            let frame = close
                .frame
                .unwrap_or_else(|| ws::close_frame(close.code, &close.reason));
            self.frames.push_back((frame, FrameClass::Durable));
            self.close_queued = true;
        }
    }

    /// Takes what the outbox holds, without waiting.
    fn refill(&mut self, outbox: &Outbox) {
        if !self.close_queued {
            let written = std::mem::take(&mut self.unreported);
            let taken = outbox.take(&mut self.frames, written);
            self.accept(taken);
        }
    }

    /// Like [`Writer::refill`], registering for a wake-up when nothing is queued.
    fn poll_refill(&mut self, cx: &mut Context<'_>, outbox: &Outbox) -> Poll<()> {
        if self.close_queued {
            return Poll::Pending;
        }
        let written = std::mem::take(&mut self.unreported);
        outbox
            .poll_take(cx, &mut self.frames, written)
            .map(|taken| self.accept(taken))
    }

    /// Writes as much as the socket takes now, with vectored writes straight from the shared
    /// frame buffers (no staging copy): up to `MAX_IOV` frames or about `MAX_WRITE_BYTES` per
    /// syscall. `Ok(true)` when anything was written.
    fn flush(&mut self, socket: &TcpStream) -> std::io::Result<bool> {
        let mut progressed = false;
        while !self.frames.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let (mut count, mut bytes) = (0, 0);
            for (frame, _) in &self.frames {
                if count == MAX_IOV || bytes >= MAX_WRITE_BYTES {
                    break;
                }
                let part = if count == 0 {
                    &frame[self.offset..]
                } else {
                    &frame[..]
                };
                slices[count] = IoSlice::new(part);
                count += 1;
                bytes += part.len();
            }
            let mut written = match socket.try_write_vectored(&slices[..count]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(written) => written,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(progressed),
                Err(e) => return Err(e),
            };
            progressed = true;
            while written > 0 {
                let rest = self.frames[0].0.len() - self.offset;
                if written < rest {
                    self.offset += written;
                    break;
                }
                written -= rest;
                if let Some((frame, _)) = self.frames.pop_front() {
                    // The close frame (always last) came from the writer, not the outbox.
                    if !(self.close_queued && self.frames.is_empty()) {
                        self.unreported.frames += 1;
                        self.unreported.bytes += frame.len();
                    }
                }
                self.offset = 0;
            }
        }
        if self.frames.capacity() <= SMALL_QUEUE {
            self.frames = Frames::new();
        }
        Ok(progressed)
    }
}

/// What woke a waiting connection.
enum Wake {
    Readable(std::io::Result<()>),
    Writable,
    Queued,
    LingerOver,
    WriteStalled,
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
    /// Rooms this connection joined, with their shard.
    joined: HashMap<String, usize>,
    requests: TokenBucket,
    typing: TokenBucket,
}

impl Session {
    /// Queues the reply of a code answered on the connection's task (its error, if refused).
    fn answer(
        &self,
        code: Code,
        reply: Result<bytes::Bytes, ProtocolError>,
        room_id: Option<&str>,
        reference: Option<&str>,
    ) {
        match reply {
            Ok(frame) => {
                self.shared.metrics.frames_out(OutCode::Response(code), 1);
                self.conn.outbox.push(frame, FrameClass::Durable);
            }
            Err(error) => self.error(code.response(), room_id, reference, &error),
        }
    }

    fn error(
        &self,
        code: &str,
        room_id: Option<&str>,
        reference: Option<&str>,
        error: &ProtocolError,
    ) {
        liveness::send_error(
            &self.shared.metrics,
            &self.conn.outbox,
            code,
            Some(&self.conn.claims.sub),
            room_id,
            reference,
            error,
        );
    }

    /// Checks and parses one text message. Whatever the connection can answer itself is
    /// answered here; a room request comes back with the index of the shard that owns the room.
    fn on_text(&mut self, payload: &[u8], received: Instant) -> Option<Dispatch> {
        // The token is taken before anything else, so malformed frames and unknown codes cost
        // a client its budget like valid ones.
        let allowed = self.requests.take(received);
        let rate_limited =
            || ProtocolError::new(ErrorCode::RateLimited, "too many requests, slow down");
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
                let error = if allowed { e.error } else { rate_limited() };
                self.error(&code, e.room_id.as_deref(), e.reference.as_deref(), &error);
                return None;
            }
        };
        let reference_owned = envelope.reference.map(|r| r.into_owned());
        let room_owned = envelope.room_id.map(|r| r.into_owned());
        let reference = reference_owned.as_deref();
        let room_id = room_owned.as_deref();
        let Some(code) = Code::parse(&envelope.code) else {
            self.shared.metrics.frame_in(None);
            let error = if allowed {
                ProtocolError::new(
                    ErrorCode::UnknownCode,
                    format!("unknown code {:?}", envelope.code),
                )
            } else {
                rate_limited()
            };
            self.error(&response_code(&envelope.code), room_id, reference, &error);
            return None;
        };
        self.shared.metrics.frame_in(Some(code));
        if !allowed {
            self.error(code.response(), room_id, reference, &rate_limited());
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
                // The broadcast runs as a task; when too many run, the change is refused before
                // it is made, so the status others see never differs from the registry's.
                let Ok(permit) = self.shared.presence_tasks.clone().try_acquire_owned() else {
                    let error =
                        ProtocolError::new(ErrorCode::Unavailable, "server busy, retry later");
                    self.error(code.response(), room_id, reference, &error);
                    return None;
                };
                if let Some(rooms) = self
                    .shared
                    .presence
                    .set_status(&self.conn.user_key(), presence.status)
                {
                    let frame = presence_frame(&self.conn.claims.sub, None, presence.status);
                    spawn_presence_broadcast(self.shared.clone(), rooms, &self.conn, frame, permit);
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
                RoomAction::Typing(typing)
            }
            Command::Join(join) => RoomAction::Join(join),
            Command::Leave => RoomAction::Leave,
            Command::Chat(chat) => RoomAction::Chat(chat),
            Command::ReadReceipt(receipt) => RoomAction::ReadReceipt(receipt),
            Command::Historic(historic) => RoomAction::Historic(historic),
            Command::Note(note) => RoomAction::Note(note),
            Command::ConversationGet(get) => RoomAction::ConversationGet(get),
            Command::ConversationUpdate(update) => RoomAction::ConversationUpdate(update),
            Command::End(end) => RoomAction::End(end),
            Command::ConversationList(list) => {
                list.spawn(
                    self.shared.clone(),
                    self.conn.clone(),
                    reference_owned.clone(),
                );
                return None;
            }
            Command::Rate(rate) => RoomAction::Rate(rate),
            Command::Escalate(escalate) => RoomAction::Escalate(escalate),
            Command::Track(tracked) => {
                tracked.apply(&self.shared, &self.conn, room_owned.as_deref());
                return None;
            }
            Command::SubscribeDashboard(subscribe) => {
                let reply = subscribe.apply(&self.shared, &self.conn, reference_owned.as_deref());
                self.answer(code, reply, room_id, reference);
                return None;
            }
            Command::SubscribeInbox(subscribe) => {
                let reply = subscribe.apply(&self.shared, &self.conn, reference_owned.as_deref());
                self.answer(code, reply, room_id, reference);
                return None;
            }
        };
        let room_id = room_owned
            .clone()
            .expect("room codes carry a room_id (checked above)");
        let room = RoomKey::new(&self.conn.claims.tenant, &room_id);
        let shard_index = shard::shard_of(&room, self.shared.shards.len());
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
        let file_ids = action.file_ids();
        if file_ids.is_empty() {
            let request = RoomRequest {
                conn: self.conn.clone(),
                room,
                reference: reference_owned,
                received,
                action,
            };
            return Some(Dispatch::Now(shard_index, ShardCommand::Room(request)));
        }
        // A message attaching uploaded files goes to its room once they are found to exist;
        // this connection reads nothing more until then, so its requests keep their order.
        let (shared, conn) = (self.shared.clone(), self.conn.clone());
        Some(Dispatch::Later(Box::pin(async move {
            let checked = crate::http::files::check_attachments(&shared, &room, &file_ids).await;
            match checked {
                Ok(()) => {
                    let request = RoomRequest {
                        conn,
                        room,
                        reference: reference_owned,
                        received,
                        action,
                    };
                    let _ = shared.shards[shard_index]
                        .commands
                        .send(ShardCommand::Room(request))
                        .await;
                }
                Err(error) => {
                    shared.metrics.error(error.code);
                    shared.metrics.frames_out(OutCode::Response(code), 1);
                    let frame = FrameBuilder::error(
                        code.response(),
                        Some(&conn.claims.sub),
                        Some(&room.room_id),
                        reference_owned.as_deref(),
                        &error,
                    );
                    conn.outbox.push(frame, FrameClass::Durable);
                }
            }
        })))
    }

    async fn on_close(self) {
        // Take the user's rooms before the shards forget this connection's memberships (each
        // `Disconnect` also drops the room from the user's presence entry), or a shard thread
        // that runs first leaves nobody to tell that the user went offline.
        self.shared
            .inbox
            .unsubscribe(&self.conn.claims.tenant, self.conn.id);
        self.shared.dashboards.disconnected(&self.conn);
        let offline_rooms = self
            .shared
            .presence
            .disconnect(&self.conn.user_key(), self.conn.id);
        let mut by_shard: HashMap<usize, Vec<RoomKey>> = HashMap::new();
        for (room, shard) in self.joined {
            let room = RoomKey::new(&self.conn.claims.tenant, &room);
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
            // A closing connection waits its turn rather than skip telling the others.
            if let Ok(permit) = self.shared.presence_tasks.clone().acquire_owned().await {
                spawn_presence_broadcast(self.shared.clone(), rooms, &self.conn, frame, permit);
            }
        }
    }
}

/// Hands a command to a shard. The channel is bounded, so a busy shard slows this connection
/// down instead of queueing without limit. The waiting send is boxed because it is rare, and its
/// state would otherwise sit in every idle connection's future.
fn send_to_shard(shared: &Arc<Shared>, shard: usize, command: ShardCommand) -> Option<ShardSend> {
    match shared.shards[shard].commands.try_send(command) {
        Err(mpsc::error::TrySendError::Full(command)) => {
            let shared = shared.clone();
            Some(Box::pin(async move {
                let _ = shared.shards[shard].commands.send(command).await;
            }))
        }
        _ => None,
    }
}

/// A send to a busy shard's queue, waiting for room (or a request's check before its send).
type ShardSend = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a request read from the socket goes.
// `Now` is nearly every request: boxing it would cost an allocation per frame.
#[allow(clippy::large_enum_variant)]
enum Dispatch {
    /// To this shard's queue now.
    Now(usize, ShardCommand),
    /// Once this future, which sends it or answers it, has run.
    Later(ShardSend),
}

/// A request being handed to a shard (counted in its connection's shard's `dispatching`)
/// until dropped.
struct Dispatching(Arc<AtomicUsize>);

impl Drop for Dispatching {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What handling the input already read left to do.
enum Handled {
    /// A frame was handled (or the input refused); with a send to wait for when its shard's
    /// queue was full.
    Frame(Option<ShardSend>),
    /// No complete frame is buffered.
    NeedBytes,
}

/// Sends one presence frame to every connection sharing one of `rooms` (of the sender's
/// tenant) with the sender, once each, except the sender itself.
fn spawn_presence_broadcast(
    shared: Arc<Shared>,
    rooms: Vec<String>,
    sender: &ConnRef,
    frame: Bytes,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    if rooms.is_empty() {
        return;
    }
    let tenant = &sender.claims.tenant;
    let rooms: Vec<RoomKey> = rooms.iter().map(|r| RoomKey::new(tenant, r)).collect();
    let except = sender.id;
    tokio::spawn(async move {
        let mut by_shard: HashMap<usize, Vec<RoomKey>> = HashMap::new();
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
            let command = ShardCommand::CollectMembers {
                rooms,
                frame: frame.clone(),
                except,
                reply: tx,
            };
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
        drop(permit);
    });
}

/// Boxed, because most connections never have one: a deadline `after` from now.
fn deadline(after: Duration) -> Pin<Box<Sleep>> {
    Box::pin(tokio::time::sleep(after))
}

/// Reads and drops what the peer sends until it closes its side, the connection fails, it
/// sends nothing for [`LINGER_QUIET`] (it has stopped sending, and has had the time to read
/// what came before), or `linger` passes.
async fn drain_input(stream: &TcpStream, mut linger: Pin<&mut Sleep>) {
    let mut scratch = vec![0u8; 4096];
    loop {
        tokio::select! {
            _ = linger.as_mut() => return,
            _ = tokio::time::sleep(LINGER_QUIET) => return,
            readable = stream.readable() => {
                if readable.is_err() {
                    return;
                }
                match stream.try_read(&mut scratch) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }
    }
}

/// One connection's state, all of it owned by its task.
struct Connection {
    shared: Arc<Shared>,
    stream: TcpStream,
    /// The client sent its close frame (and, if it keeps to the protocol, sends nothing more).
    peer_closed: bool,
    outbox: Arc<Outbox>,
    session: Option<Session>,
    reader: FrameReader,
    assembler: Assembler,
    writer: Writer,
    /// Set once closing: input is no longer handled, only drained while the close frame waits
    /// to be written, until this deadline at most.
    linger: Option<Pin<Box<Sleep>>>,
    /// Set while queued frames wait for the socket to take them.
    write_stall: Option<Pin<Box<Sleep>>>,
    guard: ConnectionGuard,
}

/// Sets up a connection on the current (shard) runtime; the returned future runs it to
/// completion. The setup is not part of the future, so the task that runs it holds only what
/// the connection keeps.
pub fn run(
    shared: Arc<Shared>,
    upgraded: Upgraded,
    mode: Mode,
    shard_index: usize,
) -> Option<impl Future<Output = ()> + Send> {
    let Some((stream, leftover)) = into_socket(upgraded) else {
        tracing::warn!("upgraded connection is not a tcp stream");
        return None;
    };
    let config = &shared.config;
    let conn_id = shared.next_conn_id();
    let outbox = Arc::new(Outbox::new(
        Bound {
            frames: config.outbound_queue,
            bytes: config.outbound_queue_bytes,
        },
        shared.outbox_metrics.clone(),
    ));
    let claims = match &mode {
        Mode::Protocol(claims) => Some(claims.clone()),
        Mode::Echo => None,
    };
    let guard = shared.track_connection(
        shard_index,
        conn_id,
        LiveConn {
            outbox: outbox.clone(),
            claims,
        },
    );
    let session = match mode {
        Mode::Protocol(claims) => {
            let conn = ConnRef {
                id: conn_id,
                home: shard_index,
                outbox: outbox.clone(),
                claims,
            };
            shared.presence.connect(&conn);
            let session_id = ulid::Ulid::new().to_string();
            let frame = FrameBuilder::encode(&crate::codec::Reply {
                success: true,
                code: "connected",
                user_id: Some(&conn.claims.sub),
                room_id: None,
                reference: None,
                timestamp: storage::Timestamp::now(),
                data: ConnectedData {
                    session_id: &session_id,
                    tenant_id: &conn.claims.tenant,
                    heartbeat_ms: config.heartbeat_ms,
                },
            });
            shared.metrics.frames_out(OutCode::Connected, 1);
            outbox.push(frame, FrameClass::Durable);
            Some(Session {
                shared: shared.clone(),
                conn,
                joined: HashMap::new(),
                requests: TokenBucket::new(f64::from(config.rate_limit), config.rate_burst),
                typing: TokenBucket::new(
                    f64::from(config.typing_rate),
                    config.typing_rate.saturating_mul(2),
                ),
            })
        }
        Mode::Echo => None,
    };
    let connection = Connection {
        reader: FrameReader {
            buf: leftover,
            max_payload: config.max_message_bytes,
        },
        assembler: Assembler::new(config.max_message_bytes),
        shared,
        stream,
        outbox,
        session,
        writer: Writer::default(),
        linger: None,
        peer_closed: false,
        write_stall: None,
        guard,
    };
    Some(connection.serve())
}

impl Connection {
    fn close(&self, code: u16, reason: &str) {
        liveness::close(&self.shared.metrics, &self.outbox, code, reason);
    }

    /// Stops handling input; the close frame has until the linger deadline to go out.
    fn closing(&mut self) {
        self.linger.get_or_insert_with(|| deadline(CLOSE_LINGER));
    }

    // Not an `async fn`: its argument would be stored twice in the future (once as the
    // argument, once as the binding), doubling every connection's task.
    #[allow(clippy::manual_async_fn)]
    fn serve(mut self) -> impl Future<Output = ()> + Send {
        async move {
            self.shared.metrics.connections[self.shard()].inc();
            let mut linger_input = false;
            loop {
                // 1. Handle complete frames already read: a few per turn, so that replies
                // get written between them when a client sends faster than its shard takes
                // requests. Every frame counts against the task's cooperative budget: a client
                // that keeps its socket full must not hold the shard's thread (rooms and other
                // connections run there too).
                let mut handled = 0;
                let mut more_input = false;
                while let Handled::Frame(send) = self.handle_buffered() {
                    tokio::task::consume_budget().await;
                    handled += 1;
                    let waited = send.is_some();
                    if let Some(send) = send {
                        send.await;
                    }
                    if waited || handled == FRAMES_PER_TURN {
                        more_input = true;
                        break;
                    }
                }

                // 2. Write what is queued, as far as the socket takes it now.
                self.writer.refill(&self.outbox);
                match self.writer.flush(&self.stream) {
                    Ok(progressed) => {
                        if !self.writer.has_pending() {
                            self.write_stall = None;
                        } else if progressed || self.write_stall.is_none() {
                            // The socket is full: the peer has the write timeout to take more.
                            let timeout =
                                Duration::from_millis(self.shared.config.write_timeout_ms);
                            match &mut self.write_stall {
                                Some(stall) => {
                                    stall.as_mut().reset(tokio::time::Instant::now() + timeout)
                                }
                                None => self.write_stall = Some(deadline(timeout)),
                            }
                        }
                    }
                    // The peer is gone: nothing more can be delivered.
                    Err(_) => break,
                }
                if self.writer.close_written() {
                    // The close frame is out (an echo completes the handshake; for a close of ours
                    // the client has what it needs to reconnect): done.
                    let _ = self.stream.shutdown().await;
                    // A client that did not close first may still be sending: closing a socket
                    // with input unread sends a reset, which can destroy the close frame before
                    // the client reads it. So its input is drained (below) until it closes too.
                    linger_input = !self.peer_closed;
                    break;
                }

                if more_input {
                    continue;
                }

                // 3. Wait for bytes, for room in the socket, for frames or a close, or a deadline.
                match poll_fn(|cx| self.poll_wake(cx)).await {
                    Wake::Readable(Ok(())) => match self.reader.fill(&self.stream) {
                        Ok(true) => self.outbox.seen(clock_ms()),
                        Ok(false) | Err(_) => break,
                    },
                    Wake::Writable | Wake::Queued => {}
                    Wake::Readable(Err(_)) | Wake::LingerOver | Wake::WriteStalled => break,
                }
            }

            self.shared.metrics.connections[self.shard()].dec();
            // Boxed: the close path runs once, and keeping its state out of this future keeps
            // every idle connection smaller.
            let on_close = self
                .session
                .take()
                .map(|session| Box::pin(session.on_close()));
            if let Some(on_close) = on_close {
                on_close.await;
            }
            // Best effort, without waiting: what is still queued and a close frame, if the socket
            // takes them now.
            if !self.writer.close_written() {
                self.outbox.close(1001, "closing");
                self.writer.refill(&self.outbox); // the frames queued before the close,
                self.writer.refill(&self.outbox); // then the close itself
                let _ = self.writer.flush(&self.stream);
            }
            if linger_input {
                let linger = self
                    .linger
                    .get_or_insert_with(|| deadline(CLOSE_LINGER))
                    .as_mut();
                // Boxed: it runs once per connection, and kept apart it does not grow every
                // connection's future.
                Box::pin(drain_input(&self.stream, linger)).await;
            }
        }
    }

    fn shard(&self) -> usize {
        self.guard.shard()
    }

    /// Handles the next complete frame already read, if there is one. Kept out of `serve`, and
    /// returning only a boxed future, so that no frame or command sits in the connection's
    /// future while it waits.
    fn handle_buffered(&mut self) -> Handled {
        if self.linger.is_some() {
            self.reader.buf = BytesMut::new();
        }
        // Counted until it is queued at its shard, and none is taken once shutdown began, so
        // that shutdown drains the shards only after every request taken is queued (see
        // `Shared::stop_requests`); what is left unread then gets no answer.
        let dispatching = &self.shared.shards[self.shard()].dispatching;
        dispatching.fetch_add(1, Ordering::SeqCst);
        if self.shared.requests_stopped() {
            dispatching.fetch_sub(1, Ordering::SeqCst);
            self.reader.buf = BytesMut::new();
            return Handled::NeedBytes;
        }
        let handled = self.handle_next_frame();
        let dispatching = &self.shared.shards[self.shard()].dispatching;
        match handled {
            Handled::Frame(Some(send)) => {
                let queued = Dispatching(dispatching.clone());
                Handled::Frame(Some(Box::pin(async move {
                    send.await;
                    drop(queued);
                })))
            }
            handled => {
                dispatching.fetch_sub(1, Ordering::SeqCst);
                handled
            }
        }
    }

    fn handle_next_frame(&mut self) -> Handled {
        match self.reader.next_frame() {
            Ok(Some((head, payload))) => {
                let send = match self.on_frame(head, payload) {
                    Some(Dispatch::Now(shard, command)) => {
                        send_to_shard(&self.shared, shard, command)
                    }
                    Some(Dispatch::Later(send)) => Some(send),
                    None => None,
                };
                Handled::Frame(send)
            }
            Ok(None) => Handled::NeedBytes,
            Err((code, reason)) => {
                self.close(code, reason);
                self.closing();
                Handled::Frame(None)
            }
        }
    }

    /// Handles one client frame; a room request comes back for the caller to hand to its shard.
    fn on_frame(&mut self, head: ws::ClientHead, payload: Bytes) -> Option<Dispatch> {
        let (opcode, message) = match head.opcode {
            OpCode::Close => {
                self.peer_closed = true;
                match ws::check_close_payload(&payload) {
                    // Echo the peer's close after what is queued, then stop.
                    Ok(()) => self
                        .outbox
                        .close_with_frame(ws::frame(OpCode::Close, &payload)),
                    Err((code, reason)) => self.close(code, reason),
                }
                self.closing();
                return None;
            }
            OpCode::Ping => {
                self.outbox
                    .push(ws::frame(OpCode::Pong, &payload), FrameClass::Ephemeral);
                return None;
            }
            OpCode::Pong => return None,
            opcode => match self.assembler.push(opcode, head.fin, payload) {
                Ok(Some(message)) => message,
                Ok(None) => return None,
                Err((code, reason)) => {
                    self.close(code, reason);
                    self.closing();
                    return None;
                }
            },
        };
        match (&mut self.session, opcode) {
            (Some(session), OpCode::Text) => session.on_text(&message, Instant::now()),
            (Some(_), _) => {
                self.close(1003, "binary frames are not accepted");
                self.closing();
                None
            }
            (None, opcode) => {
                self.outbox
                    .push(ws::frame(opcode, &message), FrameClass::Durable);
                None
            }
        }
    }

    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        if let Some(linger) = &mut self.linger {
            if linger.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::LingerOver);
            }
        }
        if let Some(stall) = &mut self.write_stall {
            if stall.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::WriteStalled);
            }
        }
        if let Poll::Ready(result) = self.stream.poll_read_ready(cx) {
            return Poll::Ready(Wake::Readable(result));
        }
        if self.writer.has_pending() {
            if self.stream.poll_write_ready(cx).is_ready() {
                return Poll::Ready(Wake::Writable);
            }
        } else if self.writer.poll_refill(cx, &self.outbox).is_ready() {
            return Poll::Ready(Wake::Queued);
        }
        Poll::Pending
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
}
