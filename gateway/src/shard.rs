//! Room shards: one thread per core, each running its own single-threaded runtime and owning
//! its rooms outright (members, sequencing of commits, read-receipt and typing fan-out). Frames
//! for a room reach its shard over a bounded channel; nothing on the message path takes a lock
//! shared with another shard. The same runtime also runs the connections accepted onto it.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use serde::Serialize;
use serde_json::value::RawValue;
use storage::{
    Appended, Direction, HistoryPage, HistoryQuery, NewMessage, Room, RoomKey, RoomKind, Store,
    Timestamp,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::auth::{may_join, Access, Claims, Role};
use crate::cmd::chat::Chat;
use crate::cmd::historic::Historic;
use crate::cmd::join::Join;
use crate::cmd::presence::PresenceStatus;
use crate::cmd::typing::TypingStatus;
use crate::cmd::Code;
use crate::codec::{ErrorCode, FrameBuilder, ProtocolError};
use crate::liveness::{self, Registry};
use crate::mailbox::{Delivery, Mailbox};
use crate::metrics::OutCode;
use crate::outbox::{FrameClass, Outbox};
use crate::presence::UserKey;
use crate::server::Shared;

/// Connection ids are unique for the life of the process.
pub type ConnId = u64;

/// Bytes of frames one shard's mailbox holds for its connections before posts to it are refused
/// (see [`crate::mailbox`]).
const MAILBOX_BYTES: usize = 64 * 1024 * 1024;
/// Chat commits all shards together keep in flight before they stop taking requests
/// (back-pressure): the embedded store's write queue, so that overload slows clients down
/// rather than filling the queue and getting writes refused.
const APPENDS_IN_FLIGHT: usize = storage::sqlite::DEFAULT_QUEUE_CAPACITY;
/// Sends of one chat to the store: the first, and renumberings after seq conflicts.
const MAX_APPEND_ATTEMPTS: u8 = 4;
/// Chat ids with an unknown write outcome remembered per room.
const MAX_UNKNOWN_OUTCOMES: usize = 64;
/// Most requests queued for one room while it loads; more are answered UNAVAILABLE.
const MAX_QUEUED_WHILE_LOADING: usize = 1024;
/// Most requests one connection may have held for a room while its join reply is prepared;
/// more are answered RATE_LIMITED.
const MAX_HELD_PER_MEMBER: usize = 64;
/// Most helper tasks (room loads and creations, join replies, history pages, read receipts)
/// one shard runs at once; requests beyond are answered UNAVAILABLE.
const MAX_SHARD_TASKS: usize = 1024;

/// What a shard knows of a connection that talks to it.
#[derive(Clone)]
pub struct ConnRef {
    pub id: ConnId,
    /// The shard whose thread runs the connection: frames from other shards reach it through
    /// that shard's mailbox.
    pub home: usize,
    pub outbox: Arc<Outbox>,
    pub claims: Arc<Claims>,
}

impl ConnRef {
    /// The user this connection speaks for, as the presence registry keys it.
    pub fn user_key(&self) -> UserKey {
        UserKey {
            tenant: self.claims.tenant.clone(),
            user_id: self.claims.sub.clone(),
        }
    }
}

/// A request about one room, with what is needed to answer it.
pub struct RoomRequest {
    pub conn: ConnRef,
    /// The room in the caller's tenant: ids are unique within a tenant only.
    pub room: RoomKey,
    pub reference: Option<String>,
    /// When the connection read the frame (fan-out latency starts here).
    pub received: Instant,
    pub action: RoomAction,
}

pub enum RoomAction {
    Join(Join),
    Leave,
    Chat(Chat),
    Typing(TypingStatus),
    ReadReceipt { message_id: String },
    Historic(Historic),
}

impl RoomAction {
    fn code(&self) -> Code {
        match self {
            RoomAction::Join(_) => Code::Join,
            RoomAction::Leave => Code::Leave,
            RoomAction::Chat(_) => Code::Chat,
            RoomAction::Typing(_) => Code::Typing,
            RoomAction::ReadReceipt { .. } => Code::ReadReceipt,
            RoomAction::Historic(_) => Code::Historic,
        }
    }
}

/// Everything a shard can be asked.
// `Room` is nearly every command sent; boxing it would cost an allocation per frame to shrink
// the rare ones.
#[allow(clippy::large_enum_variant)]
pub enum ShardCommand {
    Room(RoomRequest),
    /// The connection closed: forget it in these rooms (all owned by this shard).
    Disconnect {
        conn: ConnId,
        rooms: Vec<RoomKey>,
    },
    /// Presence fan-out: the connections joined to any of these rooms.
    /// Members whose join reply is being prepared get `frame` behind it, from the shard;
    /// `except` gets nothing.
    CollectMembers {
        rooms: Vec<RoomKey>,
        frame: Bytes,
        except: ConnId,
        reply: oneshot::Sender<Vec<(ConnId, Arc<Outbox>)>>,
    },
    /// Answers once every chat commit started before it has finished and its replies are
    /// queued (graceful shutdown waits for this before it closes the connections).
    Drain(oneshot::Sender<()>),
    /// Finish in-flight commits, then stop.
    Shutdown,
}

/// Completions of work the shard handed to helper tasks.
enum ShardEvent {
    RoomLoaded {
        room_id: RoomKey,
        result: storage::Result<Option<Room>>,
    },
    RoomCreated {
        room_id: RoomKey,
        result: storage::Result<Room>,
    },
    JoinReady {
        room_id: RoomKey,
        conn: ConnId,
        frame: Bytes,
        /// `false` when the reply is an error: the connection is not joined after all.
        ok: bool,
    },
    ReceiptStored {
        room_id: RoomKey,
        conn: ConnRef,
        broadcast: Option<Bytes>,
        /// The message is a note: customers must not learn of it.
        team_only: bool,
    },
}

/// The handle other threads use to reach a shard.
#[derive(Clone)]
pub struct ShardHandle {
    pub index: usize,
    pub runtime: tokio::runtime::Handle,
    pub commands: mpsc::Sender<ShardCommand>,
    /// The connections running on this shard's thread.
    pub live: Arc<Registry>,
    /// Frames other shards hand over for the connections running here.
    pub mailbox: Arc<Mailbox>,
}

/// Which shard owns a room (tenant and id: the same id in two tenants names two rooms).
pub fn shard_of(room: &RoomKey, shards: usize) -> usize {
    let mut h = DefaultHasher::new();
    room.hash(&mut h);
    (h.finish() % shards as u64) as usize
}

/// Starts a shard thread; returns its handle and the thread's join handle.
pub fn spawn(
    index: usize,
    queue: usize,
    shared_rx: oneshot::Receiver<Arc<Shared>>,
) -> std::io::Result<(ShardHandle, std::thread::JoinHandle<()>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let (tx, rx) = mpsc::channel(queue);
    let thread = std::thread::Builder::new()
        .name(format!("shard-{index}"))
        .spawn(move || {
            let _exit_on_panic = ExitOnPanic(index);
            runtime.block_on(async move {
                let Ok(shared) = shared_rx.await else {
                    return;
                };
                // The sweep is this shard's heartbeat and expiry: if it dies, so does the shard.
                let sweep = tokio::spawn(liveness::sweep(shared.clone(), index));
                tokio::spawn(async move {
                    if let Err(e) = sweep.await {
                        if e.is_panic() {
                            exit_after_panic(index);
                        }
                    }
                });
                Shard::new(index, shared).run(rx).await;
            });
            // Connections still running on this runtime are dropped with it.
        })?;
    Ok((
        ShardHandle {
            index,
            runtime: handle,
            commands: tx,
            live: Arc::default(),
            mailbox: Arc::new(Mailbox::new(MAILBOX_BYTES)),
        },
        thread,
    ))
}

/// Ends the process when a shard thread panics: its rooms and connections are gone, and a
/// process that limps on half-dead (requests routed to the dead shard never answered, `/readyz`
/// still 200) is worse than one that a supervisor restarts at once.
struct ExitOnPanic(usize);

impl Drop for ExitOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            exit_after_panic(self.0);
        }
    }
}

/// Ends the process with status 70 (EX_SOFTWARE) after a shard's thread or sweep panicked.
fn exit_after_panic(shard: usize) -> ! {
    tracing::error!(shard, "shard panicked, exiting");
    eprintln!("shard {shard} panicked, exiting");
    std::process::exit(70)
}

/// Frames for a member that wait for its join reply, bounded like its outbox.
#[derive(Default)]
struct Pending {
    frames: Vec<(Bytes, FrameClass)>,
    bytes: usize,
}

struct Member {
    conn: ConnRef,
    /// While a join reply is being prepared, frames for this member wait here so the client
    /// sees the join reply first and then every later event, in order.
    pending: Option<Pending>,
    /// The room's `last_seq` when this connection joined: it has everything up to there (in
    /// `missed`, or before the point it chose to start from), and hears of later messages live.
    joined_at_seq: u64,
    /// Later requests of this connection for this room, held while the join reply is being
    /// prepared and replayed in order once it is out (so a pipelined `leave` cannot drop the
    /// join reply, nor a `chat` overtake it).
    held: Vec<RoomRequest>,
}

struct RoomState {
    room: Room,
    members: HashMap<ConnId, Member>,
    /// What keeps the room loaded besides its members: chat commits on their way through the
    /// store, and requests being replayed into it.
    inflight: u32,
    /// Ids of recent chats whose write had an unknown outcome (bounded), so that a retry that
    /// finds one stored announces it to the room.
    unknown_outcomes: VecDeque<String>,
    /// The seq the next chat gets: this shard is the room's only writer, so it numbers the
    /// room's messages itself (recovered from the stored `last_seq` when the room loads) and
    /// the store only fences (see [`Shard::on_appended`]).
    next_seq: u64,
    /// The stored `last_seq` the last renumbering started from, so that every chat refused
    /// with the same one is renumbered after the previous instead of onto the same seq.
    renumbered_from: Option<u64>,
    /// Appends of this room at the store now (first sends and renumbered ones).
    sending: u32,
    /// Set while chats already numbered are being refused and renumbered: a chat that arrives
    /// then waits in `held` until the room's sends are all answered, because a number handed
    /// out now could be stored ahead of an earlier chat still to be renumbered.
    renumbering: bool,
    /// Chats that arrived while renumbering, in arrival order, not numbered yet. Bounded with
    /// the shard's appends (see [`Shard::held_appends`]).
    held: VecDeque<AppendContext>,
}

// Most rooms are `Ready`, and every request reads one: boxing it would add a pointer chase
// to every request to shrink the brief `Loading` state.
#[allow(clippy::large_enum_variant)]
enum Slot {
    /// Waiting for the store; requests queue up here in arrival order.
    Loading(Vec<RoomRequest>),
    Ready(RoomState),
}

/// What answering a chat's append needs.
struct AppendContext {
    room_id: RoomKey,
    conn: ConnRef,
    reference: Option<String>,
    /// When the frame was read.
    received: Instant,
    /// A copy of what went to the store, renumbered and sent again when its seq was taken.
    message: NewMessage,
    /// Sends so far (renumbering after a seq conflict sends again).
    attempts: u8,
}
type AppendFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (AppendContext, storage::Result<Appended>)> + Send>,
>;

struct Shard {
    index: usize,
    shared: Arc<Shared>,
    rooms: HashMap<RoomKey, Slot>,
    appends: FuturesOrdered<AppendFuture>,
    /// Chat commits started and finished so far (they finish in order).
    appends_started: u64,
    appends_finished: u64,
    /// `Drain` requests with the number of commits each waits for.
    drains: Vec<(u64, oneshot::Sender<()>)>,
    /// Completions of helper tasks; bounded, as the tasks are (`work`).
    events_tx: mpsc::Sender<ShardEvent>,
    events_rx: mpsc::Receiver<ShardEvent>,
    /// Permits for helper tasks: at most `MAX_SHARD_TASKS` run at once.
    work: Arc<Semaphore>,
    /// Deliveries from other shards for connections running here, and the buffer they are
    /// taken into.
    mailbox: Arc<Mailbox>,
    inbound: Vec<Delivery>,
    /// Scratch member lists, one per shard, for broadcasts.
    lists: Vec<Vec<Arc<Outbox>>>,
    /// This shard's share of [`APPENDS_IN_FLIGHT`]; chats held back while their room renumbers
    /// count against it too.
    max_appends: usize,
    held_appends: usize,
    /// Join replies being prepared by helper tasks.
    joins_in_flight: usize,
}

/// How frames leave a shard: straight into the outboxes of connections running on its own
/// thread, through the mailbox of the shard a connection runs on otherwise. Everything one shard
/// sends one connection takes the same way, so it arrives in order.
#[derive(Clone, Copy)]
struct Route<'a> {
    shards: &'a [ShardHandle],
    here: usize,
}

impl<'a> Route<'a> {
    fn new(shards: &'a [ShardHandle], here: usize) -> Self {
        Route { shards, here }
    }

    fn send(&self, conn: &ConnRef, frame: Bytes, class: FrameClass) {
        if conn.home == self.here {
            conn.outbox.push(frame, class);
        } else {
            self.shards[conn.home].mailbox.post(Delivery::Direct {
                frame,
                class,
                outbox: conn.outbox.clone(),
            });
        }
    }

    /// Sends one frame to each of `members`: local outboxes directly, and one delivery per
    /// other shard that has any, carrying its list (`lists` is scratch space, one list per
    /// shard, kept between broadcasts). Returns how many members it went to.
    fn broadcast<'m>(
        &self,
        lists: &mut [Vec<Arc<Outbox>>],
        members: impl Iterator<Item = &'m mut Member>,
        frame: &Bytes,
        class: FrameClass,
    ) -> u64 {
        let mut n = 0;
        for member in members {
            n += 1;
            if member.pending.is_some() {
                self.deliver(member, frame.clone(), class);
            } else if member.conn.home == self.here {
                member.conn.outbox.push(frame.clone(), class);
            } else {
                lists[member.conn.home].push(member.conn.outbox.clone());
            }
        }
        for (shard, list) in lists.iter_mut().enumerate() {
            if !list.is_empty() {
                self.shards[shard].mailbox.post(Delivery::Broadcast {
                    frame: frame.clone(),
                    class,
                    outboxes: std::mem::take(list),
                });
            }
        }
        n
    }

    /// Queues a frame for a member: sent on, or held behind its join reply while that is being
    /// prepared. Frames held there count against the same bound as the outbox: past it,
    /// ephemeral frames are dropped and a durable one closes the connection with 1013.
    fn deliver(&self, member: &mut Member, frame: Bytes, class: FrameClass) {
        let Some(pending) = &mut member.pending else {
            return self.send(&member.conn, frame, class);
        };
        let (queued_frames, queued_bytes) = member.conn.outbox.queued();
        let frames = pending.frames.len() + queued_frames;
        let bytes = pending.bytes + queued_bytes;
        if member
            .conn
            .outbox
            .bound()
            .exceeded_by(frames, bytes, frame.len())
        {
            if class == FrameClass::Ephemeral {
                return member.conn.outbox.count_dropped();
            }
            member.pending = None;
            return member.conn.outbox.overflow();
        }
        pending.bytes += frame.len();
        pending.frames.push((frame, class));
    }
}

impl Shard {
    fn new(index: usize, shared: Arc<Shared>) -> Shard {
        let (events_tx, events_rx) = mpsc::channel(MAX_SHARD_TASKS);
        Shard {
            index,
            rooms: HashMap::new(),
            appends: FuturesOrdered::new(),
            appends_started: 0,
            appends_finished: 0,
            drains: Vec::new(),
            events_tx,
            events_rx,
            work: Arc::new(Semaphore::new(MAX_SHARD_TASKS)),
            mailbox: shared.shards[index].mailbox.clone(),
            inbound: Vec::new(),
            lists: vec![Vec::new(); shared.shards.len()],
            max_appends: (APPENDS_IN_FLIGHT / shared.shards.len()).max(64),
            held_appends: 0,
            joins_in_flight: 0,
            shared,
        }
    }

    /// Where this shard's frames go (see [`Route`]).
    fn route(&self) -> Route<'_> {
        Route::new(&self.shared.shards, self.index)
    }

    /// A permit to start a helper task, or `None` when the shard runs as many as it may.
    fn try_work(&self) -> Option<OwnedSemaphorePermit> {
        self.work.clone().try_acquire_owned().ok()
    }

    fn reply_busy(&self, request: &RoomRequest) {
        self.reply_error(
            &request.conn,
            request.action.code(),
            &request.room,
            request.reference.as_deref(),
            server_busy(),
        );
    }

    async fn run(mut self, mut commands: mpsc::Receiver<ShardCommand>) {
        let mut stopping = false;
        loop {
            tokio::select! {
                biased;
                Some((ctx, result)) = self.appends.next(), if !self.appends.is_empty() => {
                    self.on_appended(ctx, result);
                    self.appends_finished += 1;
                    self.answer_drains();
                }
                Some(event) = self.events_rx.recv() => self.on_event(event),
                () = poll_fn(|cx| self.mailbox.poll_take(cx, &mut self.inbound)) => {
                    for delivery in self.inbound.drain(..) {
                        delivery.deliver();
                    }
                }
                // With as many chat commits in flight as the store should hold, or every helper
                // task permit taken, the shard stops taking requests: its channel fills,
                // connections stop reading, and TCP pushes back on the clients, instead of
                // requests being read only to be refused.
                command = commands.recv(),
                    if !stopping
                        && self.appends.len() + self.held_appends < self.max_appends
                        && self.work.available_permits() > 0 => match command {
                    Some(ShardCommand::Shutdown) | None => stopping = true,
                    Some(command) => self.on_command(command),
                },
                else => break,
            }
            if stopping && self.appends.is_empty() {
                break;
            }
        }
        tracing::debug!(shard = self.index, "shard stopped");
    }

    fn reply_error(
        &self,
        conn: &ConnRef,
        code: Code,
        room_id: &RoomKey,
        reference: Option<&str>,
        error: ProtocolError,
    ) {
        self.shared.metrics.error(error.code);
        self.shared.metrics.frames_out(OutCode::Response(code), 1);
        let frame = FrameBuilder::error(
            code.response(),
            Some(&conn.claims.sub),
            Some(&room_id.room_id),
            reference,
            &error,
        );
        self.route().send(conn, frame, FrameClass::Durable);
    }

    fn on_command(&mut self, command: ShardCommand) {
        match command {
            ShardCommand::Room(request) => self.on_room_request(request),
            ShardCommand::Disconnect { conn, rooms } => {
                for room_id in rooms {
                    self.remove_member(&room_id, conn);
                }
            }
            ShardCommand::CollectMembers {
                rooms,
                frame,
                except,
                reply,
            } => {
                let route = Route::new(&self.shared.shards, self.index);
                let mut out = Vec::new();
                for room_id in &rooms {
                    let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) else {
                        continue;
                    };
                    for member in state.members.values_mut() {
                        if member.conn.id == except {
                            continue;
                        }
                        if member.pending.is_some() {
                            // Not before the member's join reply: behind it, like room events.
                            route.deliver(member, frame.clone(), FrameClass::Ephemeral);
                        } else {
                            out.push((member.conn.id, member.conn.outbox.clone()));
                        }
                    }
                }
                let _ = reply.send(out);
            }
            ShardCommand::Drain(reply) => {
                self.drains.push((self.appends_started, reply));
                self.answer_drains();
            }
            ShardCommand::Shutdown => {}
        }
    }

    /// Answers the `Drain` requests whose commits have all finished.
    fn answer_drains(&mut self) {
        // Runs after every commit; there is nothing to do outside a shutdown.
        if self.drains.is_empty() {
            return;
        }
        // Chats held behind a join being prepared are read but not started yet: wait for the
        // joins too (their held chats then start, and the targets move past them).
        if self.joins_in_flight > 0 {
            return;
        }
        let finished = self.appends_finished;
        let (done, waiting) = std::mem::take(&mut self.drains)
            .into_iter()
            .partition(|(target, _)| *target <= finished);
        self.drains = waiting;
        for (_, reply) in done {
            let _ = reply.send(());
        }
    }

    /// Routes a request for a room by the room's state: handled at once when the room is
    /// loaded, queued while it loads, or starting its load. Every request, replayed ones
    /// included, comes through here.
    fn on_room_request(&mut self, request: RoomRequest) {
        match self.rooms.get_mut(&request.room) {
            Some(Slot::Ready(_)) => self.handle_ready(request),
            // A leave is never refused (see `handle_ready`): it waits past the cap too.
            Some(Slot::Loading(queue))
                if queue.len() < MAX_QUEUED_WHILE_LOADING
                    || matches!(request.action, RoomAction::Leave) =>
            {
                queue.push(request)
            }
            Some(Slot::Loading(_)) => self.reply_busy(&request),
            None => match &request.action {
                RoomAction::Join(_) | RoomAction::Historic(_) => self.start_loading(request),
                RoomAction::Leave => self.reply_leave(&request),
                _ => {
                    let code = request.action.code();
                    self.reply_error(
                        &request.conn,
                        code,
                        &request.room,
                        request.reference.as_deref(),
                        ProtocolError::new(ErrorCode::NotJoined, "join the room first"),
                    );
                }
            },
        }
    }

    fn start_loading(&mut self, request: RoomRequest) {
        let Some(permit) = self.try_work() else {
            return self.reply_busy(&request);
        };
        let room_id = request.room.clone();
        self.rooms
            .insert(room_id.clone(), Slot::Loading(vec![request]));
        self.update_room_gauge();
        let store = self.shared.store.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = store.room(&room_id).await;
            let _ = events
                .send(ShardEvent::RoomLoaded { room_id, result })
                .await;
            drop(permit);
        });
    }

    fn update_room_gauge(&self) {
        self.shared.metrics.rooms[self.index].set(self.rooms.len() as i64);
    }

    fn on_event(&mut self, event: ShardEvent) {
        match event {
            ShardEvent::RoomLoaded { room_id, result } => match result {
                Ok(Some(room)) => self.room_ready(room),
                Ok(None) => self.room_missing(room_id),
                Err(e) => self.room_failed(&room_id, e),
            },
            ShardEvent::RoomCreated { room_id, result } => match result {
                Ok(room) => self.room_ready(room),
                Err(e) => self.room_failed(&room_id, e),
            },
            ShardEvent::JoinReady {
                room_id,
                conn,
                frame,
                ok,
            } => {
                self.joins_in_flight -= 1;
                self.on_join_ready(room_id, conn, frame, ok);
                // Held chats replayed by this join have started: a shutdown waits for them too.
                for (target, _) in &mut self.drains {
                    *target = (*target).max(self.appends_started);
                }
                self.answer_drains();
            }
            ShardEvent::ReceiptStored {
                room_id,
                conn,
                broadcast,
                team_only,
            } => {
                if let (Some(frame), Some(Slot::Ready(state))) =
                    (broadcast, self.rooms.get_mut(&room_id))
                {
                    let route = Route::new(&self.shared.shards, self.index);
                    let members = state.members.values_mut().filter(|member| {
                        member.conn.id != conn.id
                            && (!team_only || member.conn.claims.role.is_team())
                    });
                    let n = route.broadcast(&mut self.lists, members, &frame, FrameClass::Durable);
                    self.shared
                        .metrics
                        .frames_out(OutCode::Response(Code::ReadReceipt), n);
                }
            }
        }
    }

    /// A join reply is ready: it goes out, then what waited behind it (or, when the join
    /// failed, the connection stops being a member), then the requests held behind it.
    fn on_join_ready(&mut self, room_id: RoomKey, conn: ConnId, frame: Bytes, ok: bool) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&room_id) else {
            return;
        };
        let Some(member) = state.members.get_mut(&conn) else {
            return;
        };
        let pending = member.pending.take().unwrap_or_default();
        let held = std::mem::take(&mut member.held);
        self.shared
            .metrics
            .frames_out(OutCode::Response(Code::Join), 1);
        // The events that waited for the reply follow it, in order (or overflow into a
        // 1013 close), never vanish; after a failed join there are none to send.
        let route = Route::new(&self.shared.shards, self.index);
        route.send(&member.conn, frame, FrameClass::Durable);
        if ok {
            for (frame, class) in pending.frames {
                route.send(&member.conn, frame, class);
            }
        }
        if !ok {
            // The join failed (storage): the connection is not a member after all.
            self.shared.metrics.error(ErrorCode::Unavailable);
            if let Some(member) = state.members.remove(&conn) {
                self.shared
                    .presence
                    .left(&member.conn.user_key(), &room_id.room_id);
            }
        }
        self.replay(&room_id, held);
    }

    fn room_ready(&mut self, room: Room) {
        let room_id = room.key();
        let queued = match self.rooms.insert(
            room_id.clone(),
            Slot::Ready(RoomState {
                members: HashMap::new(),
                inflight: 0,
                unknown_outcomes: VecDeque::new(),
                next_seq: room.last_seq + 1,
                renumbered_from: None,
                sending: 0,
                renumbering: false,
                held: VecDeque::new(),
                room,
            }),
        ) {
            Some(Slot::Loading(queued)) => queued,
            _ => Vec::new(),
        };
        self.replay(&room_id, queued);
    }

    /// Handles requests that waited for the room, in order, through the normal path. The room
    /// stays loaded until all of them are handled (one of them leaving it empty must not unload
    /// it under the next), then is unloaded if nothing else keeps it.
    fn replay(&mut self, room_id: &RoomKey, requests: Vec<RoomRequest>) {
        if requests.is_empty() {
            return self.maybe_unload(room_id);
        }
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) {
            state.inflight += 1;
        }
        for request in requests {
            self.on_room_request(request);
        }
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) {
            state.inflight = state.inflight.saturating_sub(1);
        }
        self.maybe_unload(room_id);
    }

    /// The room does not exist: the first join by a non-customer creates it as a team room of
    /// that caller's tenant; everything else is NOT_FOUND.
    fn room_missing(&mut self, room_id: RoomKey) {
        let Some(Slot::Loading(queued)) = self.rooms.get_mut(&room_id) else {
            return;
        };
        let creator = queued.iter().find_map(|r| match r.action {
            RoomAction::Join(_) if r.conn.claims.role != Role::Customer => Some(r.conn.clone()),
            _ => None,
        });
        let refusal = match &creator {
            None => ProtocolError::new(ErrorCode::NotFound, "room not found"),
            Some(conn) => match self.creation_refused(conn) {
                Some(refusal) => refusal,
                None => return self.create_room(room_id, conn.claims.clone()),
            },
        };
        let Some(Slot::Loading(queued)) = self.rooms.remove(&room_id) else {
            return;
        };
        self.update_room_gauge();
        for request in queued {
            let error = match request.action {
                // Leaving a room one is not in succeeds, whether the room exists or not.
                RoomAction::Leave => {
                    self.reply_leave(&request);
                    continue;
                }
                RoomAction::Join(_) if request.conn.claims.role != Role::Customer => {
                    refusal.clone()
                }
                _ => ProtocolError::new(ErrorCode::NotFound, "room not found"),
            };
            self.reply_error(
                &request.conn,
                request.action.code(),
                &request.room,
                request.reference.as_deref(),
                error,
            );
        }
    }

    /// Why this connection's join may not create a room now, if it may not: the per-connection
    /// and per-tenant creation limits.
    fn creation_refused(&self, conn: &ConnRef) -> Option<ProtocolError> {
        let config = &self.shared.config;
        if !conn
            .outbox
            .try_count_room_created(config.rooms_per_connection)
        {
            return Some(ProtocolError::new(
                ErrorCode::RateLimited,
                "this connection has created too many rooms",
            ));
        }
        if !self.shared.room_creations.allow(&conn.claims.tenant) {
            return Some(ProtocolError::new(
                ErrorCode::RateLimited,
                "too many rooms created in this tenant, retry later",
            ));
        }
        None
    }

    fn create_room(&mut self, room_id: RoomKey, claims: Arc<Claims>) {
        // The load's permit was released when it answered; creation needs its own.
        let Some(permit) = self.try_work() else {
            return self.room_failed(
                &room_id,
                storage::Error::NotApplied("no task budget to create the room".into()),
            );
        };
        let store = self.shared.store.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let new_room =
                storage::NewRoom::team(&room_id.room_id, &room_id.tenant_id, &claims.sub);
            let result = store.create_room(new_room).await.map(|(room, _)| room);
            let _ = events
                .send(ShardEvent::RoomCreated { room_id, result })
                .await;
            drop(permit);
        });
    }

    fn room_failed(&mut self, room_id: &RoomKey, error: storage::Error) {
        tracing::warn!(room_id = %room_id.room_id, error = %error, "loading a room failed");
        let Some(Slot::Loading(queued)) = self.rooms.remove(room_id) else {
            return;
        };
        self.update_room_gauge();
        for request in queued {
            if matches!(request.action, RoomAction::Leave) {
                self.reply_leave(&request);
                continue;
            }
            let code = request.action.code();
            self.reply_error(
                &request.conn,
                code,
                &request.room,
                request.reference.as_deref(),
                storage_unavailable(),
            );
        }
    }

    /// Drops a room from memory once nobody is joined and nothing is in flight.
    fn maybe_unload(&mut self, room_id: &RoomKey) {
        if let Some(Slot::Ready(state)) = self.rooms.get(room_id) {
            if state.members.is_empty() && state.inflight == 0 {
                self.rooms.remove(room_id);
                self.update_room_gauge();
            }
        }
    }

    fn remove_member(&mut self, room_id: &RoomKey, conn: ConnId) {
        match self.rooms.get_mut(room_id) {
            Some(Slot::Ready(state)) => {
                if let Some(member) = state.members.remove(&conn) {
                    self.shared
                        .presence
                        .left(&member.conn.user_key(), &room_id.room_id);
                }
            }
            // The connection is gone while the room loads: what it queued would make it a
            // member once the room is ready, with nobody left to remove it.
            Some(Slot::Loading(queued)) => queued.retain(|request| request.conn.id != conn),
            None => {}
        }
        self.maybe_unload(room_id);
    }

    fn reply_leave(&self, request: &RoomRequest) {
        self.shared
            .metrics
            .frames_out(OutCode::Response(Code::Leave), 1);
        let frame = FrameBuilder::success(
            Code::Leave.response(),
            &request.conn.claims.sub,
            Some(&request.room.room_id),
            request.reference.as_deref(),
            serde_json::Map::new(),
        );
        self.route().send(&request.conn, frame, FrameClass::Durable);
    }

    /// Handles a request for a loaded room (`on_room_request` routes here).
    fn handle_ready(&mut self, request: RoomRequest) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&request.room) else {
            // Not loaded after all: route it like any other request.
            return self.on_room_request(request);
        };
        if let Some(member) = state.members.get_mut(&request.conn.id) {
            if member.pending.is_some() {
                // A leave is never refused: the connection has forgotten the room already, so a
                // refused leave would leave a membership nobody removes. Leaves are few (each
                // costs a rate-limit token while the join lasts, at most the store deadline).
                if member.held.len() < MAX_HELD_PER_MEMBER
                    || matches!(request.action, RoomAction::Leave)
                {
                    member.held.push(request);
                    return;
                }
                let error = ProtocolError::new(
                    ErrorCode::RateLimited,
                    "too many requests for this room while joining it",
                );
                let code = request.action.code();
                return self.reply_error(
                    &request.conn,
                    code,
                    &request.room,
                    request.reference.as_deref(),
                    error,
                );
            }
        }
        let code = request.action.code();
        let joined = state.members.contains_key(&request.conn.id);
        let needs_membership = matches!(
            request.action,
            RoomAction::Chat(_) | RoomAction::Typing(_) | RoomAction::ReadReceipt { .. }
        );
        if needs_membership && !joined {
            self.reply_error(
                &request.conn,
                code,
                &request.room,
                request.reference.as_deref(),
                ProtocolError::new(ErrorCode::NotJoined, "join the room first"),
            );
            return;
        }
        match request.action {
            RoomAction::Join(join) => {
                self.join(request.conn, request.room, request.reference, join)
            }
            RoomAction::Leave => {
                self.reply_leave(&request);
                self.remove_member(&request.room, request.conn.id);
            }
            RoomAction::Chat(chat) => self.chat(
                request.conn,
                request.room,
                request.reference,
                request.received,
                chat,
            ),
            RoomAction::Typing(status) => self.typing(&request.conn, &request.room, status),
            RoomAction::ReadReceipt { message_id } => {
                self.read_receipt(request.conn, request.room, request.reference, message_id)
            }
            RoomAction::Historic(historic) => {
                self.historic(request.conn, request.room, request.reference, historic)
            }
        }
    }

    fn access_error(access: Access) -> Option<ProtocolError> {
        match access {
            Access::Allowed => None,
            Access::NotFound => Some(ProtocolError::new(ErrorCode::NotFound, "room not found")),
            Access::Forbidden => Some(ProtocolError::new(
                ErrorCode::Forbidden,
                "not a participant of this room",
            )),
        }
    }

    fn join(&mut self, conn: ConnRef, room_id: RoomKey, reference: Option<String>, join: Join) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&room_id) else {
            return;
        };
        if let Some(error) = Self::access_error(may_join(&conn.claims, &state.room)) {
            self.reply_error(&conn, Code::Join, &room_id, reference.as_deref(), error);
            self.maybe_unload(&room_id);
            return;
        }
        // A join with `since_seq` reads the store in a helper task: it needs a permit.
        let permit = match join.since_seq {
            Some(_) => match self.work.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let error = server_busy();
                    self.reply_error(&conn, Code::Join, &room_id, reference.as_deref(), error);
                    self.maybe_unload(&room_id);
                    return;
                }
            },
            None => None,
        };
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&room_id) else {
            return;
        };
        let user_key = conn.user_key();
        let already_member = state.members.contains_key(&conn.id);
        let first_of_user =
            !already_member && self.shared.presence.joined(&user_key, &room_id.room_id);
        // Tell the others this user is here, with its current status (once per user and room).
        if first_of_user {
            let status = self.shared.presence.status(&user_key);
            let frame = presence_frame(&conn.claims.sub, Some(&room_id.room_id), status);
            let route = Route::new(&self.shared.shards, self.index);
            let members = state.members.values_mut().filter(|member| {
                member.conn.claims.sub != conn.claims.sub
                    || member.conn.claims.tenant != conn.claims.tenant
            });
            let n = route.broadcast(&mut self.lists, members, &frame, FrameClass::Ephemeral);
            self.shared
                .metrics
                .frames_out(OutCode::Response(Code::Presence), n);
        }
        let mut users: Vec<&str> = state.room.participants.iter().map(String::as_str).collect();
        for member in state.members.values() {
            if member.conn.claims.tenant == state.room.tenant_id {
                users.push(&member.conn.claims.sub);
            }
        }
        users.push(&conn.claims.sub);
        users.sort_unstable();
        users.dedup();
        users.truncate(500);
        let presence: Vec<PresenceEntry> = users
            .into_iter()
            .map(|user_id| PresenceEntry {
                status: self.shared.presence.status(&UserKey {
                    tenant: state.room.tenant_id.clone(),
                    user_id: user_id.to_owned(),
                }),
                user_id: user_id.to_owned(),
            })
            .collect();
        let last_seq = state.room.last_seq;
        let room_summary = RoomSummary::of(&state.room, last_seq);
        let (Some(since), Some(permit)) = (join.since_seq, permit) else {
            // Nothing to read: the reply goes out at once.
            state.members.insert(
                conn.id,
                Member {
                    conn: conn.clone(),
                    pending: None,
                    joined_at_seq: last_seq,
                    held: Vec::new(),
                },
            );
            self.shared
                .metrics
                .frames_out(OutCode::Response(Code::Join), 1);
            let frame = FrameBuilder::success(
                Code::Join.response(),
                &conn.claims.sub,
                Some(&room_id.room_id),
                reference.as_deref(),
                JoinData {
                    room: room_summary,
                    presence,
                    missed: None,
                    has_more: None,
                },
            );
            self.route().send(&conn, frame, FrameClass::Durable);
            return;
        };
        state.members.insert(
            conn.id,
            Member {
                conn: conn.clone(),
                pending: Some(Pending::default()),
                joined_at_seq: last_seq,
                held: Vec::new(),
            },
        );
        self.joins_in_flight += 1;

        let store = self.shared.store.clone();
        let events = self.events_tx.clone();
        let budget = self.shared.config.max_reply_bytes;
        let query = HistoryQuery {
            after_seq: Some(since),
            before_seq: Some(last_seq + 1),
            limit: join.limit,
            include_notes: conn.claims.role.is_team(),
            max_bytes: budget,
        };
        tokio::spawn(async move {
            let (frame, ok) = match store.history(&room_id, query).await {
                Ok(page) => {
                    let user_id = conn.claims.sub.clone();
                    let room = room_id.clone();
                    // A page may be large: it is serialized off the shard's thread.
                    let built = tokio::task::spawn_blocking(move || {
                        let missed = page_json(&page, budget, PageEnd::Oldest);
                        FrameBuilder::success(
                            Code::Join.response(),
                            &user_id,
                            Some(&room.room_id),
                            reference.as_deref(),
                            JoinData {
                                room: room_summary,
                                presence,
                                missed: Some(missed.messages),
                                has_more: Some(missed.has_more),
                            },
                        )
                    })
                    .await;
                    match built {
                        Ok(frame) => (frame, true),
                        Err(_) => (join_unavailable(&conn, &room_id, None), false),
                    }
                }
                Err(e) => {
                    tracing::warn!(room_id = %room_id.room_id, error = %e, "reading missed messages failed");
                    (
                        join_unavailable(&conn, &room_id, reference.as_deref()),
                        false,
                    )
                }
            };
            let _ = events
                .send(ShardEvent::JoinReady {
                    room_id,
                    conn: conn.id,
                    frame,
                    ok,
                })
                .await;
            drop(permit);
        });
    }

    fn chat(
        &mut self,
        conn: ConnRef,
        room_id: RoomKey,
        reference: Option<String>,
        received: Instant,
        chat: Chat,
    ) {
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
        state.inflight += 1;
        self.appends_started += 1;
        let context = AppendContext {
            room_id,
            conn,
            reference,
            received,
            message,
            attempts: 0,
        };
        if state.renumbering {
            state.held.push_back(context);
            self.held_appends += 1;
            return;
        }
        let mut context = context;
        context.message.seq = state.next_seq;
        state.next_seq += 1;
        state.sending += 1;
        self.send_append(context);
    }

    /// Numbers and sends the chats held while the room renumbered, once all of the room's
    /// earlier sends are answered (each renumbered one is then at the store, in order).
    fn release_held(&mut self, room_id: &RoomKey) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) else {
            return;
        };
        if !state.renumbering || state.sending > 0 {
            return;
        }
        state.renumbering = false;
        state.renumbered_from = None;
        let held = std::mem::take(&mut state.held);
        self.held_appends -= held.len();
        for mut context in held {
            let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) else {
                return;
            };
            context.message.seq = state.next_seq;
            state.next_seq += 1;
            state.sending += 1;
            self.send_append(context);
        }
    }

    /// Hands the message to the store now (appends to a room are applied in call order) and
    /// answers it when the store has. The caller has numbered it and counted it in `sending`.
    fn send_append(&mut self, mut context: AppendContext) {
        context.attempts += 1;
        let pending = self.shared.store.append(context.message.clone());
        self.appends
            .push_back(Box::pin(async move { (context, pending.await) }));
    }

    /// Answers a chat once the store has. The shard numbers the room's messages; the store
    /// refuses a seq that is not the room's next one. That happens only after an earlier
    /// append of the room did not take its seq (it failed, or was a duplicate) while later
    /// ones were already on their way: those are renumbered from the stored `last_seq` the
    /// store names, all after one another, and sent again, so nothing is lost, no seq is
    /// skipped and the client sees one answer.
    ///
    /// Chats that arrive while this goes on wait (see [`RoomState::held`]) so that the room
    /// stores chats in the order they arrived.
    fn on_appended(&mut self, context: AppendContext, result: storage::Result<Appended>) {
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(&context.room_id) {
            state.sending = state.sending.saturating_sub(1);
            if let Err(storage::Error::SeqConflict { last_seq }) = &result {
                if context.attempts < MAX_APPEND_ATTEMPTS {
                    state.renumbering = true;
                    if state.renumbered_from != Some(*last_seq) {
                        state.renumbered_from = Some(*last_seq);
                        state.next_seq = last_seq + 1;
                    }
                    let mut context = context;
                    context.message.seq = state.next_seq;
                    state.next_seq += 1;
                    state.sending += 1;
                    self.shared.metrics.renumbered_appends.inc();
                    return self.send_append(context);
                }
            }
        }
        let AppendContext {
            room_id,
            conn,
            reference,
            received,
            message,
            ..
        } = context;
        let (message_id, sent_seq) = (message.message_id, message.seq);
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(&room_id) {
            state.inflight = state.inflight.saturating_sub(1);
            let seq_unused = match &result {
                Ok(appended) => appended.duplicate,
                Err(storage::Error::OutcomeUnknown(_)) => false,
                Err(_) => true,
            };
            if seq_unused {
                // Nothing took the seq: when no later chat has one either, the next chat
                // takes it; else the store's fence refuses the later ones, which are
                // renumbered, and chats arriving meanwhile wait for that.
                if state.next_seq == sent_seq + 1 {
                    state.next_seq = sent_seq;
                    // Numbering starts over from here; a later conflict renumbers afresh.
                    state.renumbered_from = None;
                } else {
                    state.renumbering = true;
                }
            }
            if matches!(result, Err(storage::Error::OutcomeUnknown(_))) {
                // It may be stored after all: when a retry finds it, the room has not heard
                // of it yet.
                if state.unknown_outcomes.len() == MAX_UNKNOWN_OUTCOMES {
                    state.unknown_outcomes.pop_front();
                }
                state.unknown_outcomes.push_back(message_id.clone());
            }
        }
        self.release_held(&room_id);
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
                self.reply_error(&conn, Code::Chat, &room_id, reference.as_deref(), error);
                self.maybe_unload(&room_id);
                return;
            }
        };
        // A duplicate from someone else (or of a message the sender may not see) is not a
        // retry: answering with the stored message would hand out another user's message.
        if appended.duplicate
            && (appended.message.sender != conn.claims.sub
                || (appended.message.direction == Direction::Note && !conn.claims.role.is_team()))
        {
            let error = ProtocolError::new(
                ErrorCode::BadRequest,
                "message_id is already used by another message in this room",
            );
            self.reply_error(&conn, Code::Chat, &room_id, reference.as_deref(), error);
            return self.maybe_unload(&room_id);
        }
        let metrics = &self.shared.metrics;
        // The reply and the room's event carry the same message: it is serialized once and
        // copied into both frames (they differ only in `ref`).
        // (Serializing a stored message cannot fail: its maps have string keys.)
        let message_json: Box<RawValue> =
            serde_json::value::to_raw_value(&appended.message).unwrap_or_default();
        let direct = FrameBuilder::success(
            Code::Chat.response(),
            &conn.claims.sub,
            Some(&room_id.room_id),
            reference.as_deref(),
            &*message_json,
        );
        let route = Route::new(&self.shared.shards, self.index);
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&room_id) else {
            route.send(&conn, direct, FrameClass::Durable);
            metrics.frames_out(OutCode::Response(Code::Chat), 1);
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
        let announce = !appended.duplicate || was_unknown;
        if announce {
            state.room.last_seq = state.room.last_seq.max(appended.message.seq);
            let event = FrameBuilder::success(
                Code::Chat.response(),
                &conn.claims.sub,
                Some(&room_id.room_id),
                None,
                &*message_json,
            );
            let customer_hidden = appended.message.direction == Direction::Note;
            let members = state.members.values_mut().filter(|member| {
                member.conn.id != conn.id
                    && (!customer_hidden || member.conn.claims.role.is_team())
                    && (!appended.duplicate || member.joined_at_seq < seq)
            });
            let n = route.broadcast(&mut self.lists, members, &event, FrameClass::Durable);
            metrics.frames_out(OutCode::Response(Code::Chat), n + 1);
            metrics.deliveries.inc_by(n);
        } else {
            metrics.frames_out(OutCode::Response(Code::Chat), 1);
        }
        // The direct reply answers a request read before any join still being prepared for this
        // connection, so it goes out now rather than behind that join's reply (and is never
        // dropped with it when that join fails).
        route.send(&conn, direct, FrameClass::Durable);
        metrics
            .fanout_latency
            .observe(received.elapsed().as_secs_f64());
        self.maybe_unload(&room_id);
    }

    fn typing(&mut self, conn: &ConnRef, room_id: &RoomKey, status: TypingStatus) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) else {
            return;
        };
        let frame = FrameBuilder::success(
            Code::Typing.response(),
            &conn.claims.sub,
            Some(&room_id.room_id),
            None,
            TypingData {
                status,
                sender: &conn.claims.sub,
            },
        );
        let route = Route::new(&self.shared.shards, self.index);
        let members = state
            .members
            .values_mut()
            .filter(|member| member.conn.id != conn.id);
        let n = route.broadcast(&mut self.lists, members, &frame, FrameClass::Ephemeral);
        self.shared
            .metrics
            .frames_out(OutCode::Response(Code::Typing), n);
    }

    fn read_receipt(
        &mut self,
        conn: ConnRef,
        room_id: RoomKey,
        reference: Option<String>,
        message_id: String,
    ) {
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
                Ok(Some(m)) if m.direction != Direction::Note || conn.claims.role.is_team() => m,
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
            let unread = Some(state.unread_for(conn.claims.role.is_team()));
            let read_at = Timestamp::now();
            let data = ReceiptData {
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
                    ReceiptData {
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
                })
                .await;
            drop(permit);
        });
    }

    fn historic(
        &mut self,
        conn: ConnRef,
        room_id: RoomKey,
        reference: Option<String>,
        historic: Historic,
    ) {
        let Some(Slot::Ready(state)) = self.rooms.get(&room_id) else {
            return;
        };
        if let Some(error) = Self::access_error(may_join(&conn.claims, &state.room)) {
            self.reply_error(&conn, Code::Historic, &room_id, reference.as_deref(), error);
            self.maybe_unload(&room_id);
            return;
        }
        let Some(permit) = self.try_work() else {
            let error = server_busy();
            self.reply_error(&conn, Code::Historic, &room_id, reference.as_deref(), error);
            return self.maybe_unload(&room_id);
        };
        let store = self.shared.store.clone();
        let (shared, here) = (self.shared.clone(), self.index);
        let metrics = self.shared.metrics.clone();
        let budget = self.shared.config.max_reply_bytes;
        // Paging forward keeps the oldest messages of a page cut to the budget, paging back
        // the newest, so the next page continues where this one stops.
        let keep = if historic.after_seq.is_some() {
            PageEnd::Oldest
        } else {
            PageEnd::Newest
        };
        let query = HistoryQuery {
            before_seq: historic.before_seq,
            after_seq: historic.after_seq,
            limit: historic.limit,
            include_notes: conn.claims.role.is_team(),
            max_bytes: budget,
        };
        let search = historic.search.map(|words| query.search(&words));
        self.maybe_unload(&room_id);
        tokio::spawn(async move {
            let unavailable = |conn: &ConnRef, room_id: &RoomKey, reference: Option<&str>| {
                metrics.error(ErrorCode::Unavailable);
                FrameBuilder::error(
                    Code::Historic.response(),
                    Some(&conn.claims.sub),
                    Some(&room_id.room_id),
                    reference,
                    &storage_unavailable(),
                )
            };
            let page = match search {
                Some(search) => store.search(&room_id, search).await,
                None => store.history(&room_id, query).await,
            };
            let frame = match page {
                Ok(page) => {
                    let (user_id, room) = (conn.claims.sub.clone(), room_id.clone());
                    let reference = reference.clone();
                    // A page may be large: it is serialized off the shard's thread.
                    let built = tokio::task::spawn_blocking(move || {
                        let json = page_json(&page, budget, keep);
                        // A page cut to the budget continues where it was cut; otherwise from
                        // where a search stopped at its row budget, if it did.
                        let (next_before_seq, next_after_seq) = match (json.cut_at, keep) {
                            (Some(seq), PageEnd::Newest) => (Some(seq), None),
                            (Some(seq), PageEnd::Oldest) => (None, Some(seq)),
                            (None, _) => (page.next_before_seq, page.next_after_seq),
                        };
                        FrameBuilder::success(
                            Code::Historic.response(),
                            &user_id,
                            Some(&room.room_id),
                            reference.as_deref(),
                            HistoricData {
                                messages: &json.messages,
                                has_more: json.has_more,
                                next_before_seq,
                                next_after_seq,
                            },
                        )
                    })
                    .await;
                    built.unwrap_or_else(|_| unavailable(&conn, &room_id, None))
                }
                Err(e) => {
                    tracing::warn!(room_id = %room_id.room_id, error = %e, "reading history failed");
                    unavailable(&conn, &room_id, reference.as_deref())
                }
            };
            metrics.frames_out(OutCode::Response(Code::Historic), 1);
            Route::new(&shared.shards, here).send(&conn, frame, FrameClass::Durable);
            drop(permit);
        });
    }
}

/// Which messages a page cut to its byte budget keeps.
#[derive(Clone, Copy)]
enum PageEnd {
    Oldest,
    Newest,
}

/// A page's messages as one JSON array of at most `budget` bytes (at least one message, however
/// big), cut at the end `keep` does not name.
struct PageJson {
    messages: Box<RawValue>,
    /// More messages follow the page: the store said so, or the budget cut it.
    has_more: bool,
    /// Where the budget cut the page: the `seq` of the last message kept at the cut end.
    cut_at: Option<u64>,
}

fn page_json(page: &HistoryPage, budget: usize, keep: PageEnd) -> PageJson {
    let mut encoded: Vec<Vec<u8>> = Vec::with_capacity(page.messages.len());
    let mut total = 2;
    let mut push = |message: &storage::Message| -> bool {
        let json = serde_json::to_vec(message).expect("serializing a message cannot fail");
        if !encoded.is_empty() && total + json.len() + 1 > budget {
            return false;
        }
        total += json.len() + 1;
        encoded.push(json);
        true
    };
    let fitted = match keep {
        PageEnd::Oldest => page.messages.iter().take_while(|m| push(m)).count(),
        PageEnd::Newest => page.messages.iter().rev().take_while(|m| push(m)).count(),
    };
    if matches!(keep, PageEnd::Newest) {
        encoded.reverse();
    }
    let mut out = Vec::with_capacity(total);
    out.push(b'[');
    for (i, json) in encoded.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(json);
    }
    out.push(b']');
    let array = String::from_utf8(out).expect("serde_json writes utf-8");
    let messages = RawValue::from_string(array).expect("an array of serialized messages is json");
    let cut = fitted < page.messages.len();
    let cut_at = cut.then(|| match keep {
        PageEnd::Oldest => page.messages[fitted - 1].seq,
        PageEnd::Newest => page.messages[page.messages.len() - fitted].seq,
    });
    PageJson {
        messages,
        has_more: page.has_more || cut,
        cut_at,
    }
}

/// `UNAVAILABLE` for a request that found no helper task to run on.
fn server_busy() -> ProtocolError {
    ProtocolError::new(ErrorCode::Unavailable, "server busy, retry later")
}

/// `UNAVAILABLE` for a request whose store call failed (nothing was changed).
fn storage_unavailable() -> ProtocolError {
    ProtocolError::new(ErrorCode::Unavailable, "storage unavailable, retry later")
}

/// The `UNAVAILABLE` reply to a join whose missed messages could not be read.
fn join_unavailable(conn: &ConnRef, room_id: &RoomKey, reference: Option<&str>) -> Bytes {
    FrameBuilder::error(
        Code::Join.response(),
        Some(&conn.claims.sub),
        Some(&room_id.room_id),
        reference,
        &storage_unavailable(),
    )
}

/// A `presence_response` event about `user_id`.
pub fn presence_frame(user_id: &str, room_id: Option<&str>, status: PresenceStatus) -> Bytes {
    FrameBuilder::success(
        Code::Presence.response(),
        user_id,
        room_id,
        None,
        PresenceData {
            status,
            sender: user_id,
        },
    )
}

#[derive(Serialize)]
struct PresenceData<'a> {
    status: PresenceStatus,
    sender: &'a str,
}

#[derive(Serialize)]
struct PresenceEntry {
    user_id: String,
    status: PresenceStatus,
}

#[derive(Serialize)]
struct RoomSummary {
    room_id: String,
    kind: &'static str,
    title: String,
    status: String,
    last_seq: u64,
}

impl RoomSummary {
    fn of(room: &Room, last_seq: u64) -> RoomSummary {
        RoomSummary {
            room_id: room.room_id.clone(),
            kind: room.kind.as_str(),
            title: room.title.clone(),
            status: room.status.clone(),
            last_seq,
        }
    }
}

#[derive(Serialize)]
struct JoinData {
    room: RoomSummary,
    presence: Vec<PresenceEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    missed: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    has_more: Option<bool>,
}

#[derive(Serialize)]
struct TypingData<'a> {
    status: TypingStatus,
    sender: &'a str,
}

#[derive(Serialize, Clone, Copy)]
struct ReceiptData<'a> {
    message_id: &'a str,
    seq: u64,
    sender: &'a str,
    read_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unread_count: Option<u64>,
}

#[derive(Serialize)]
struct HistoricData<'a> {
    messages: &'a RawValue,
    has_more: bool,
    /// Where the next page starts when this one stopped early: cut to the reply budget, or a
    /// search that used up its row budget (see `docs/protocol.md`).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after_seq: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs in a child process (this test binary again), where a panic under the guard must
    /// end the whole process with status 70 rather than just the thread.
    #[test]
    fn a_panicking_shard_thread_ends_the_process() {
        const CHILD: &str = "GATEWAY_EXIT_ON_PANIC_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let worker = std::thread::spawn(|| {
                let _guard = ExitOnPanic(3);
                panic!("a shard's state machine failed");
            });
            let _ = worker.join();
            // Only reached if the guard let the process live on.
            std::process::exit(0);
        }
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "shard::tests::a_panicking_shard_thread_ends_the_process",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(70),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stderr).contains("shard 3 panicked, exiting"));
    }
}
