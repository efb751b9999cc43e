//! Room shards: one thread per core, each running its own single-threaded runtime and owning
//! its rooms outright. Frames for a room reach its shard over a bounded channel; nothing on the
//! message path takes a lock shared with another shard. The same runtime also runs the
//! connections accepted onto it.
//!
//! This module keeps what every code shares: room ownership (loading, creating, queueing
//! requests while a room loads, unloading), membership bookkeeping, the numbering and storing
//! of messages (sequencing, renumbering after a refused seq), and fan-out ([`Route`]). What
//! each code does to a room lives in its own module under [`crate::cmd`].

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use storage::{Appended, NewMessage, Room, RoomKey, Store};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::auth::{Access, Claims, Role};
pub use crate::cmd::RoomAction;
use crate::cmd::{Code, RoomCall};
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
/// Ids of the latest chats sent to the store remembered per room (as hashes), so that a
/// repeat of one is not given a seq (see [`Shard::number_and_send`]).
const RECENT_IDS: usize = 64;
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
    /// Work from outside the shard's thread (an HTTP request, say) that must run where the
    /// room lives: it changes the room's state or reaches its members.
    Run(Box<dyn FnOnce(&mut Shard) + Send>),
}

/// Completions of work the shard handed to helper tasks.
pub(crate) enum ShardEvent {
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
        /// The seq of the message read.
        seq: u64,
    },
    /// A helper task's result, applied on the shard's thread (a code's continuation).
    Continue(Box<dyn FnOnce(&mut Shard) + Send>),
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
    /// Requests the connections running here are handing to a shard now: graceful shutdown
    /// waits for these to be queued before it drains the shards (see
    /// [`crate::server::Shared::stop_requests`]).
    pub dispatching: Arc<AtomicUsize>,
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
            dispatching: Arc::default(),
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
pub(crate) struct Pending {
    pub(crate) frames: Vec<(Bytes, FrameClass)>,
    pub(crate) bytes: usize,
}

pub(crate) struct Member {
    pub(crate) conn: ConnRef,
    /// While a join reply is being prepared, frames for this member wait here so the client
    /// sees the join reply first and then every later event, in order.
    pub(crate) pending: Option<Pending>,
    /// The room's `last_seq` when this connection joined: it has everything up to there (in
    /// `missed`, or before the point it chose to start from), and hears of later messages live.
    pub(crate) joined_at_seq: u64,
    /// Later requests of this connection for this room, held while the join reply is being
    /// prepared and replayed in order once it is out (so a pipelined `leave` cannot drop the
    /// join reply, nor a `chat` overtake it).
    pub(crate) held: Vec<RoomRequest>,
}

pub(crate) struct RoomState {
    pub(crate) room: Room,
    pub(crate) members: FastMap<ConnId, Member>,
    /// What keeps the room loaded besides its members: chat commits on their way through the
    /// store, and requests being replayed into it.
    pub(crate) inflight: u32,
    /// Ids of recent chats whose write had an unknown outcome (bounded), so that a retry that
    /// finds one stored announces it to the room.
    pub(crate) unknown_outcomes: VecDeque<String>,
    /// The seq the next chat gets: this shard is the room's only writer, so it numbers the
    /// room's messages itself (recovered from the stored `last_seq` when the room loads) and
    /// the store only fences (see [`Shard::on_appended`]).
    pub(crate) next_seq: u64,
    /// The stored `last_seq` the last renumbering started from, so that every chat refused
    /// with the same one is renumbered after the previous instead of onto the same seq.
    pub(crate) renumbered_from: Option<u64>,
    /// Appends of this room at the store now (first sends and renumbered ones).
    pub(crate) sending: u32,
    /// Set while chats already numbered are being refused and renumbered: a chat that arrives
    /// then waits in `held` until the room's sends are all answered, because a number handed
    /// out now could be stored ahead of an earlier chat still to be renumbered.
    pub(crate) renumbering: bool,
    /// Chats that arrived while renumbering, in arrival order, not numbered yet. Bounded with
    /// the shard's appends (see [`Shard::held_appends`]).
    pub(crate) held: VecDeque<AppendContext>,
    /// Hashes of the `message_id`s of the room's latest numbered chats, newest last (at most
    /// [`RECENT_IDS`]).
    pub(crate) recent_ids: VecDeque<u64>,
    /// A conversation's activity from messages stored since its last save, and whether a save
    /// is in flight (one at a time per room; see [`crate::inbox::ActivityDelta`]).
    pub(crate) activity: crate::inbox::ActivityDelta,
    pub(crate) saving_activity: bool,
    /// The latest seq its customer, and the team, said they read while it was loaded: a
    /// receipt at or below it is no news for the conversation's last-seen times.
    pub(crate) seen_seq: [u64; 2],
    /// How far each side received and read the other's messages (see [`crate::delivery`]):
    /// what this server saw, joined with what was saved before once a save answers.
    pub(crate) delivery: storage::records::DeliveryMarks,
}

// Most rooms are `Ready`, and every request reads one: boxing it would add a pointer chase
// to every request to shrink the brief `Loading` state.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Slot {
    /// Waiting for the store; requests queue up here in arrival order.
    Loading(Vec<RoomRequest>),
    Ready(RoomState),
}

/// What answering a chat's append needs.
pub(crate) struct AppendContext {
    /// The code that stores a message: `chat` or `note`.
    pub(crate) code: Code,
    pub(crate) room_id: RoomKey,
    pub(crate) conn: ConnRef,
    pub(crate) reference: Option<String>,
    /// When the frame was read.
    pub(crate) received: Instant,
    /// A copy of what went to the store, renumbered and sent again when its seq was taken.
    pub(crate) message: NewMessage,
    /// Sends so far (renumbering after a seq conflict sends again).
    pub(crate) attempts: u8,
    /// Sent without a seq of its own (seq 0, which the store's fence always refuses), as a
    /// repeat of a recent chat's id: the store answers with the original, or refuses it when
    /// the id is not stored after all, and then it is numbered like a new chat.
    pub(crate) unnumbered: bool,
    /// The store refused it unnumbered (it does not hold the id): numbered from then on,
    /// whatever the room's recent ids say.
    pub(crate) id_checked: bool,
}

/// The shard's maps of rooms and members, looked up several times per chat: foldhash, seeded
/// per map from a random per-process secret like the standard hasher, and cheaper than its
/// SipHash for short keys.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

type AppendFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (AppendContext, storage::Result<Appended>)> + Send>,
>;

/// One shard's state, owned by its thread (see the module doc).
pub struct Shard {
    pub(crate) index: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) rooms: FastMap<RoomKey, Slot>,
    pub(crate) appends: FuturesOrdered<AppendFuture>,
    /// Chat commits started and finished so far (they finish in order).
    pub(crate) appends_started: u64,
    pub(crate) appends_finished: u64,
    /// `Drain` requests with the number of commits each waits for.
    pub(crate) drains: Vec<(u64, oneshot::Sender<()>)>,
    /// Completions of helper tasks; bounded, as the tasks are (`work`).
    pub(crate) events_tx: mpsc::Sender<ShardEvent>,
    pub(crate) events_rx: mpsc::Receiver<ShardEvent>,
    /// Permits for helper tasks: at most `MAX_SHARD_TASKS` run at once.
    pub(crate) work: Arc<Semaphore>,
    /// Deliveries from other shards for connections running here, and the buffer they are
    /// taken into.
    pub(crate) mailbox: Arc<Mailbox>,
    pub(crate) inbound: Vec<Delivery>,
    /// Scratch member lists, one per shard, for broadcasts.
    pub(crate) lists: Vec<Vec<Arc<Outbox>>>,
    /// This shard's share of [`APPENDS_IN_FLIGHT`]; chats held back while their room renumbers
    /// count against it too.
    pub(crate) max_appends: usize,
    pub(crate) held_appends: usize,
    /// Hashes chat ids for [`RoomState::recent_ids`]; seeded per process, so that ids that
    /// collide cannot be chosen (a collision only costs a chat one more trip to the store).
    pub(crate) id_hasher: foldhash::fast::RandomState,
    /// Join replies being prepared by helper tasks.
    pub(crate) joins_in_flight: usize,
    /// Room loads and creations under way (requests for the room wait in its `Loading` slot).
    pub(crate) loads_in_flight: usize,
}

/// How frames leave a shard: straight into the outboxes of connections running on its own
/// thread, through the mailbox of the shard a connection runs on otherwise. Everything one shard
/// sends one connection takes the same way, so it arrives in order.
#[derive(Clone, Copy)]
pub(crate) struct Route<'a> {
    shards: &'a [ShardHandle],
    here: usize,
}

impl<'a> Route<'a> {
    pub(crate) fn new(shards: &'a [ShardHandle], here: usize) -> Self {
        Route { shards, here }
    }

    pub(crate) fn send(&self, conn: &ConnRef, frame: Bytes, class: FrameClass) {
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
    pub(crate) fn broadcast<'m>(
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
    pub(crate) fn deliver(&self, member: &mut Member, frame: Bytes, class: FrameClass) {
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
            rooms: FastMap::default(),
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
            id_hasher: foldhash::fast::RandomState::default(),
            joins_in_flight: 0,
            loads_in_flight: 0,
            shared,
        }
    }

    /// Where this shard's frames go (see [`Route`]).
    pub(crate) fn route(&self) -> Route<'_> {
        Route::new(&self.shared.shards, self.index)
    }

    /// A permit to start a helper task, or `None` when the shard runs as many as it may.
    pub(crate) fn try_work(&self) -> Option<OwnedSemaphorePermit> {
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
                // Last, so that it runs once nothing above is ready (and at the latest when
                // the task's scheduling budget runs out): see `Integration::push`.
                () = std::future::ready(()), if self.shared.integration.wake_owed(self.index) => {
                    self.shared.integration.wake(self.index);
                }
                else => break,
            }
            if stopping && self.appends.is_empty() {
                break;
            }
        }
        if self.shared.integration.wake_owed(self.index) {
            self.shared.integration.wake(self.index);
        }
        tracing::debug!(shard = self.index, "shard stopped");
    }

    pub(crate) fn reply_error(
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
            ShardCommand::Run(work) => work(self),
        }
    }

    /// Answers the `Drain` requests whose commits have all finished.
    fn answer_drains(&mut self) {
        // Runs after every commit; there is nothing to do outside a shutdown.
        if self.drains.is_empty() {
            return;
        }
        // Chats held behind a join being prepared, or queued while their room loads, are read
        // but not started yet: wait for those too (their chats then start, and the targets move
        // past them).
        if self.joins_in_flight > 0 || self.loads_in_flight > 0 {
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
                action if action.loads_room() => self.start_loading(request),
                RoomAction::Leave => {
                    self.reply_leave(&request.conn, &request.room, request.reference.as_deref())
                }
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
        self.loads_in_flight += 1;
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

    /// A room load or creation ended: the chats queued while it loaded have started (or been
    /// answered), so a shutdown waits for them too.
    fn load_ended(&mut self) {
        self.loads_in_flight = self.loads_in_flight.saturating_sub(1);
        for (target, _) in &mut self.drains {
            *target = (*target).max(self.appends_started);
        }
        self.answer_drains();
    }

    fn on_event(&mut self, event: ShardEvent) {
        match event {
            ShardEvent::RoomLoaded { room_id, result } => {
                match result {
                    Ok(Some(room)) => self.room_ready(room),
                    Ok(None) => self.room_missing(room_id),
                    Err(e) => self.room_failed(&room_id, e),
                }
                self.load_ended();
            }
            ShardEvent::RoomCreated { room_id, result } => {
                match result {
                    Ok(room) => self.room_ready(room),
                    Err(e) => self.room_failed(&room_id, e),
                }
                self.load_ended();
            }
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
                seq,
            } => self.receipt_stored(room_id, conn, broadcast, team_only, seq),
            ShardEvent::Continue(then) => then(self),
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
                members: FastMap::default(),
                inflight: 0,
                unknown_outcomes: VecDeque::new(),
                next_seq: room.last_seq + 1,
                renumbered_from: None,
                sending: 0,
                renumbering: false,
                held: VecDeque::new(),
                recent_ids: VecDeque::new(),
                activity: Default::default(),
                saving_activity: false,
                seen_seq: [0; 2],
                delivery: Default::default(),
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
                    self.reply_leave(&request.conn, &request.room, request.reference.as_deref());
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
        self.loads_in_flight += 1;
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
                self.reply_leave(&request.conn, &request.room, request.reference.as_deref());
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
    pub(crate) fn maybe_unload(&mut self, room_id: &RoomKey) {
        if let Some(Slot::Ready(state)) = self.rooms.get(room_id) {
            if state.members.is_empty() && state.inflight == 0 {
                self.rooms.remove(room_id);
                self.update_room_gauge();
            }
        }
    }

    pub(crate) fn remove_member(&mut self, room_id: &RoomKey, conn: ConnId) {
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
        if request.action.members_only() && !state.members.contains_key(&request.conn.id) {
            return self.reply_error(
                &request.conn,
                code,
                &request.room,
                request.reference.as_deref(),
                ProtocolError::new(ErrorCode::NotJoined, "join the room first"),
            );
        }
        let RoomRequest {
            conn,
            room,
            reference,
            received,
            action,
        } = request;
        action.apply(
            self,
            RoomCall {
                conn,
                room,
                reference,
                received,
            },
        );
    }

    /// Starts storing a chat: numbered and sent now, or held while the room renumbers (see
    /// [`RoomState::held`]).
    pub(crate) fn start_append(&mut self, context: AppendContext) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&context.room_id) else {
            return;
        };
        state.inflight += 1;
        self.appends_started += 1;
        if state.renumbering {
            state.held.push_back(context);
            self.held_appends += 1;
            return;
        }
        self.number_and_send(context);
    }

    /// Numbers a chat and sends it to the store; the caller has checked that the room is not
    /// renumbering. A chat whose id is among the room's recent ones (and not `id_checked`) is sent
    /// without a seq instead: a client's retry, or a copy pipelined behind the original, would
    /// otherwise leave its seq unused and make every later chat of the room in flight be
    /// refused and renumbered (and, after [`MAX_APPEND_ATTEMPTS`], fail).
    fn number_and_send(&mut self, mut context: AppendContext) {
        let id_hash = self.id_hasher.hash_one(context.message.message_id.as_str());
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&context.room_id) else {
            return;
        };
        if !context.id_checked && state.recent_ids.contains(&id_hash) {
            context.unnumbered = true;
            context.message.seq = 0;
            return self.send_append(context);
        }
        if state.recent_ids.len() == RECENT_IDS {
            state.recent_ids.pop_front();
        }
        state.recent_ids.push_back(id_hash);
        context.unnumbered = false;
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
        for context in held {
            if !matches!(self.rooms.get(room_id), Some(Slot::Ready(_))) {
                return;
            }
            self.number_and_send(context);
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
        if context.unnumbered {
            return self.on_unnumbered_appended(context, result);
        }
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
            code,
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
        self.answer_stored(code, room_id, conn, reference, received, message_id, result);
    }

    /// Answers a chat sent without a seq (a repeat of a recent id). The store refuses it with
    /// a seq conflict when it does not hold the id (the original failed, or the hashes of two
    /// ids collided): it is then numbered like a chat that has just arrived.
    fn on_unnumbered_appended(
        &mut self,
        context: AppendContext,
        result: storage::Result<Appended>,
    ) {
        if matches!(result, Err(storage::Error::SeqConflict { .. })) {
            if let Some(Slot::Ready(state)) = self.rooms.get_mut(&context.room_id) {
                let mut context = context;
                context.unnumbered = false;
                context.id_checked = true;
                if state.renumbering {
                    state.held.push_back(context);
                    self.held_appends += 1;
                    return;
                }
                return self.number_and_send(context);
            }
        }
        let AppendContext {
            code,
            room_id,
            conn,
            reference,
            received,
            message,
            ..
        } = context;
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(&room_id) {
            state.inflight = state.inflight.saturating_sub(1);
        }
        self.answer_stored(
            code,
            room_id,
            conn,
            reference,
            received,
            message.message_id,
            result,
        );
    }
}

/// The error reply for a room the caller may not see (`NOT_FOUND`, so that its existence does
/// not leak) or may not enter.
pub(crate) fn access_error(access: Access) -> Option<ProtocolError> {
    match access {
        Access::Allowed => None,
        Access::NotFound => Some(ProtocolError::new(ErrorCode::NotFound, "room not found")),
        Access::Forbidden => Some(ProtocolError::new(
            ErrorCode::Forbidden,
            "not a participant of this room",
        )),
    }
}

/// `UNAVAILABLE` for a request that found no helper task to run on.
pub(crate) fn server_busy() -> ProtocolError {
    ProtocolError::new(ErrorCode::Unavailable, "server busy, retry later")
}

/// `UNAVAILABLE` for a request whose store call failed (nothing was changed).
pub(crate) fn storage_unavailable() -> ProtocolError {
    ProtocolError::new(ErrorCode::Unavailable, "storage unavailable, retry later")
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
