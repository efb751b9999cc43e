//! The load scenarios. Everything runs on one thread (a `LocalSet`): the generator is pinned to
//! one core, and a single thread needs no locks or atomics per frame.

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use gateway::auth::{now_secs, Claims, KeySource, Role, Verifier};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::client::{self, find, keys, number_after, Frame, FrameReader, Protocol};
use crate::stats::Stats;

/// Connections per source address: stays well below the ~28k ephemeral ports of one address.
const CONNECTIONS_PER_SOURCE: usize = 25_000;

/// Where and as whom to connect.
pub struct Target {
    pub server: SocketAddr,
    pub verifier: Verifier,
    pub tenant: String,
    /// Unique per run so rooms start empty.
    pub run_id: String,
    /// Plain WebSocket (the gateway) or Socket.IO framing.
    pub protocol: Protocol,
}

impl Target {
    pub fn new(server: SocketAddr, secret: &str, tenant: &str, protocol: Protocol) -> Target {
        Target {
            server,
            verifier: Verifier::new(KeySource::Secret(secret.as_bytes()), &[], &[], 0)
                .expect("an hmac key always builds"),
            tenant: tenant.to_owned(),
            run_id: format!("{:x}", now_secs()),
            protocol,
        }
    }

    /// A token of `user` in the target's tenant, minted with the gateway's secret.
    pub fn token(&self, user: &str, role: Role) -> String {
        let claims = Claims {
            sub: user.to_owned(),
            tenant: self.tenant.clone(),
            role,
            exp: now_secs() + 86_400,
            name: None,
            aud: None,
            iss: None,
        };
        self.verifier
            .mint(&claims)
            .expect("minting with a secret works")
    }

    /// Opens a support conversation with `customer` over the HTTP API (`POST
    /// /api/conversations`, as an admin); returns the HTTP status.
    pub async fn open_conversation(&self, room: &str, customer: &str) -> std::io::Result<u16> {
        use tokio::io::AsyncReadExt;
        let body =
            format!(r#"{{"room_id":"{room}","kind":"support","participants":["{customer}"]}}"#);
        let request = format!(
            "POST /api/conversations HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.server,
            self.token("loadgen-admin", Role::Admin),
            body.len()
        );
        let mut stream = tokio::net::TcpStream::connect(self.server).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let status = std::str::from_utf8(&response)
            .ok()
            .and_then(|text| text.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        Ok(status)
    }

    /// Connects and upgrades as `user`; with Socket.IO, also waits for the Engine.IO open
    /// packet, connects to the default namespace (`40`) and waits for its `40{…}` answer, so
    /// that the first envelope sent cannot arrive before the namespace is joined.
    pub async fn connect(
        &self,
        index: usize,
        user: &str,
    ) -> std::io::Result<(FrameReader, OwnedWriteHalf)> {
        self.connect_as(index, user, Role::Admin).await
    }

    /// [`Target::connect`] with a role of its own (every other scenario's users are admins).
    pub async fn connect_as(
        &self,
        index: usize,
        user: &str,
        role: Role,
    ) -> std::io::Result<(FrameReader, OwnedWriteHalf)> {
        let path = self.protocol.path(&self.token(user, role));
        let stream = client::connect(self.server, self.source(index), &path).await?;
        let (mut reader, mut write) = client::split(stream);
        if self.protocol == Protocol::Socketio {
            let mut connect = Vec::with_capacity(8);
            client::encode_text(&mut connect, b"40");
            write.write_all(&connect).await?;
            let handshake = async {
                let mut connected = false;
                while !connected {
                    let mut on_frame = |frame: Frame<'_>| {
                        if let Frame::Text(p) = frame {
                            connected |= p.starts_with(b"40");
                        }
                    };
                    if !reader.read_some(&mut on_frame).await {
                        return Err(std::io::Error::other("socket.io: closed during connect"));
                    }
                }
                Ok(())
            };
            tokio::time::timeout(Duration::from_secs(10), handshake)
                .await
                .map_err(|_| std::io::Error::other("socket.io: no namespace connect"))??;
        }
        Ok((reader, write))
    }

    /// Source address for the `index`-th connection: 127.0.0.1, 127.0.0.2, … so one machine
    /// can open more than 64k connections to a loopback server.
    fn source(&self, index: usize) -> Option<IpAddr> {
        if !self.server.ip().is_loopback() || !self.server.is_ipv4() {
            return None;
        }
        let n = (index / CONNECTIONS_PER_SOURCE) as u8;
        Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + n)))
    }

    pub fn room(&self, name: &str) -> String {
        format!("lg-{}-{name}", self.run_id)
    }
}

/// A live connection: frames to send go through an unbounded channel to its writer task,
/// which writes everything queued in one syscall.
#[derive(Clone)]
pub struct Conn {
    pub user: Rc<str>,
    protocol: Protocol,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Signalled on every direct reply (frames carrying our `ref`).
    pub replies: Rc<Notify>,
    pub alive: Rc<Cell<bool>>,
}

impl Conn {
    /// Connects, upgrades and starts the reader and writer tasks.
    pub async fn open(
        target: &Target,
        index: usize,
        user: &str,
        stats: Rc<Stats>,
    ) -> std::io::Result<Conn> {
        Conn::open_as(target, index, user, Role::Admin, stats).await
    }

    /// [`Conn::open`] as a user of `role`.
    pub async fn open_as(
        target: &Target,
        index: usize,
        user: &str,
        role: Role,
        stats: Rc<Stats>,
    ) -> std::io::Result<Conn> {
        let (mut reader, mut write) = match target.connect_as(index, user, role).await {
            Ok(halves) => halves,
            Err(e) => {
                stats.connect_failures.set(stats.connect_failures.get() + 1);
                return Err(e);
            }
        };
        stats.connected.set(stats.connected.get() + 1);
        let protocol = target.protocol;
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let replies = Rc::new(Notify::new());
        let alive = Rc::new(Cell::new(true));
        tokio::task::spawn_local(async move {
            let mut batch = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.clear();
                batch.extend_from_slice(&first);
                while let Ok(more) = rx.try_recv() {
                    batch.extend_from_slice(&more);
                }
                if write.write_all(&batch).await.is_err() {
                    break;
                }
            }
        });
        let pong_tx = tx.clone();
        let (reply_signal, alive_flag) = (replies.clone(), alive.clone());
        tokio::task::spawn_local(async move {
            let mut close_seen = false;
            let mut on_frame = |frame: Frame<'_>| match frame {
                // An Engine.IO ping: answer with a pong (`3`).
                Frame::Text(b"2") if protocol == Protocol::Socketio => {
                    let mut pong = Vec::with_capacity(7);
                    client::encode_text(&mut pong, b"3");
                    let _ = pong_tx.send(pong);
                }
                Frame::Text(payload) => classify(&stats, &reply_signal, payload),
                Frame::Ping(payload) => {
                    let mut pong = Vec::with_capacity(6 + payload.len());
                    client::encode_pong(&mut pong, payload);
                    let _ = pong_tx.send(pong);
                }
                Frame::Close(code) => {
                    close_seen = true;
                    stats.closed(code);
                }
                Frame::Other => {}
            };
            while reader.read_some(&mut on_frame).await {}
            if !close_seen {
                stats.closed(1006);
            }
            alive_flag.set(false);
            reply_signal.notify_one();
        });
        Ok(Conn {
            user: user.into(),
            protocol,
            tx,
            replies,
            alive,
        })
    }

    /// Queues one text frame carrying the JSON envelope `json`.
    pub fn send(&self, json: &str) {
        let mut frame = Vec::with_capacity(json.len() + 28);
        self.protocol.encode(&mut frame, json.as_bytes());
        let _ = self.tx.send(frame);
    }

    pub fn join(&self, room: &str, reference: &str) {
        self.send(&format!(
            r#"{{"code":"join","user_id":"{}","room_id":"{room}","data":{{}},"ref":"{reference}"}}"#,
            self.user
        ));
    }
}

/// Counts one text frame: direct replies carry our `ref` (`t<intended ns>`), chat events from
/// others carry the intended send time in the message text (`t=<ns>`).
fn classify(stats: &Stats, replies: &Notify, payload: &[u8]) {
    let reply = number_after(payload, &keys::REF);
    if find(payload, &keys::ERROR).is_some() {
        stats.error();
        if reply.is_some() {
            replies.notify_one();
        }
        return;
    }
    if let Some(intended) = reply {
        stats.acked(Some(intended));
        replies.notify_one();
    } else if find(payload, &keys::CHAT_RESPONSE).is_some() {
        stats.delivered(number_after(payload, &keys::MESSAGE_TIME));
    } else if find(payload, &keys::CONVERSATION_RESPONSE).is_some()
        || find(payload, &keys::NOTIFICATION_RESPONSE).is_some()
    {
        stats.pushed();
    }
}

/// A chat frame whose text carries the intended send time, padded to `size` bytes.
pub fn chat_frame(
    user: &str,
    room: &str,
    intended_ns: u64,
    size: usize,
    message_id: Option<&str>,
) -> String {
    let mut text = format!("t={intended_ns} ");
    while text.len() < size {
        text.push('x');
    }
    let id = message_id
        .map(|m| format!(r#","message_id":"{m}""#))
        .unwrap_or_default();
    format!(
        r#"{{"code":"chat","user_id":"{user}","room_id":"{room}","ref":"t{intended_ns}","data":{{"message":"{text}","sender":"{user}"{id}}}}}"#
    )
}

/// Opens `count` connections spread evenly over `ramp_up`, naming users with `user_of`.
pub async fn open_many(
    target: &Target,
    stats: &Rc<Stats>,
    count: usize,
    ramp_up: Duration,
    user_of: impl Fn(usize) -> String,
) -> Vec<Option<Conn>> {
    let gap = if count > 0 {
        ramp_up / count as u32
    } else {
        Duration::ZERO
    };
    let mut conns = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        conns.push(Conn::open(target, i, &user_of(i), stats.clone()).await.ok());
        tokio::time::sleep_until(started + gap * (i as u32 + 1)).await;
    }
    conns
}

/// An open-loop schedule: the k-th event is due at `start + k / rate`; a late sender catches
/// up at once, and latency is counted from the due time.
pub struct Schedule {
    start: Instant,
    interval: Duration,
    k: u64,
}

impl Schedule {
    pub fn new(rate_per_sec: f64, offset: Duration) -> Schedule {
        Schedule {
            start: Instant::now() + offset,
            interval: Duration::from_secs_f64(1.0 / rate_per_sec.max(0.001)),
            k: 0,
        }
    }

    /// Waits for the next due time and returns it.
    pub async fn next(&mut self) -> Instant {
        let due = self.start + self.interval.mul_f64(self.k as f64);
        self.k += 1;
        tokio::time::sleep_until(due).await;
        due
    }
}

/// Nanoseconds since the run's epoch of a tokio instant.
pub fn ns_of(stats: &Stats, at: Instant) -> u64 {
    at.into_std()
        .saturating_duration_since(stats.epoch)
        .as_nanos() as u64
}

/// What one open-loop sender does: where, how fast, how big, until when.
#[derive(Clone)]
pub struct Plan {
    pub room: String,
    /// Events per second.
    pub rate: f64,
    /// Message text size in bytes.
    pub size: usize,
    pub until: Instant,
    /// Delay of the first event, to spread senders' phases.
    pub offset: Duration,
}

/// Runs a sender that stops when `until` passes.
pub fn spawn_chat_sender(conn: Conn, plan: Plan, stats: Rc<Stats>) {
    tokio::task::spawn_local(async move {
        let Plan {
            room,
            rate,
            size,
            until,
            offset,
        } = plan;
        let mut schedule = Schedule::new(rate, offset);
        loop {
            let due = schedule.next().await;
            if due >= until || !conn.alive.get() {
                break;
            }
            conn.send(&chat_frame(
                &conn.user,
                &room,
                ns_of(&stats, due),
                size,
                None,
            ));
            stats.sent();
        }
    });
}

/// `mixed`: per member, a repeating pattern of 20 actions: 4 chats, 12 typing updates, 3 read
/// receipts (of its own latest message) and 1 presence change.
pub fn spawn_mixed_member(conn: Conn, plan: Plan, stats: Rc<Stats>, index: usize) {
    const PATTERN: [u8; 20] = [
        b'c', b't', b't', b't', b'r', b'c', b't', b't', b't', b'r', b'c', b't', b't', b't', b'r',
        b'c', b't', b't', b't', b'p',
    ];
    tokio::task::spawn_local(async move {
        let Plan {
            room,
            rate,
            size,
            until,
            offset,
        } = plan;
        let mut schedule = Schedule::new(rate, offset);
        let mut chats = 0u64;
        let mut step = index;
        loop {
            let due = schedule.next().await;
            if due >= until || !conn.alive.get() {
                break;
            }
            let user = &conn.user;
            let t = ns_of(&stats, due);
            match PATTERN[step % PATTERN.len()] {
                b'c' => {
                    chats += 1;
                    let id = format!("m-{user}-{chats}");
                    conn.send(&chat_frame(user, &room, t, size, Some(&id)));
                    stats.sent();
                }
                b't' => {
                    let status = if step.is_multiple_of(2) {
                        "started"
                    } else {
                        "stopped"
                    };
                    conn.send(&format!(
                        r#"{{"code":"typing","user_id":"{user}","room_id":"{room}","data":{{"status":"{status}","sender":"{user}"}}}}"#
                    ));
                }
                b'r' if chats > 0 => {
                    conn.send(&format!(
                        r#"{{"code":"read_receipt","user_id":"{user}","room_id":"{room}","ref":"t{t}","data":{{"message_id":"m-{user}-{chats}","sender":"{user}"}}}}"#
                    ));
                    stats.request();
                }
                b'p' => {
                    let status = if (step / PATTERN.len()).is_multiple_of(2) {
                        "away"
                    } else {
                        "online"
                    };
                    conn.send(&format!(
                        r#"{{"code":"presence","user_id":"{user}","data":{{"status":"{status}","sender":"{user}"}}}}"#
                    ));
                }
                _ => {}
            }
            step += 1;
        }
    });
}

/// `history`: a closed-loop reader alternating `historic` and `join` + `since_seq` requests.
pub fn spawn_history_reader(conn: Conn, room: String, stats: Rc<Stats>, until: Instant) {
    tokio::task::spawn_local(async move {
        let mut k = 0u64;
        while Instant::now() < until && conn.alive.get() {
            let t = stats.now_ns();
            let user = &conn.user;
            let frame = if k.is_multiple_of(2) {
                format!(
                    r#"{{"code":"historic","user_id":"{user}","room_id":"{room}","ref":"t{t}","data":{{"limit":50}}}}"#
                )
            } else {
                format!(
                    r#"{{"code":"join","user_id":"{user}","room_id":"{room}","ref":"t{t}","data":{{"since_seq":0,"limit":100}}}}"#
                )
            };
            conn.send(&frame);
            stats.request();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.replies.notified()).await;
            k += 1;
        }
    });
}

/// `churn`: connect → join → chat → leave → disconnect, as fast as replies come back.
pub fn spawn_churn_worker(target: Rc<Target>, worker: usize, stats: Rc<Stats>, until: Instant) {
    tokio::task::spawn_local(async move {
        let room = target.room(&format!("churn-{}", worker % 16));
        let mut cycle = 0usize;
        while Instant::now() < until {
            let user = format!("churn-{worker}-{}", cycle % 4);
            let started = stats.now_ns();
            let Ok((mut reader, mut write)) = target.connect(worker, &user).await else {
                stats.connect_failures.set(stats.connect_failures.get() + 1);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut out = Vec::new();
            for json in [
                format!(r#"{{"code":"join","user_id":"{user}","room_id":"{room}","data":{{}}}}"#),
                chat_frame(&user, &room, started, 100, None),
                format!(
                    r#"{{"code":"leave","user_id":"{user}","room_id":"{room}","data":{{}},"ref":"leave"}}"#
                ),
            ] {
                target.protocol.encode(&mut out, json.as_bytes());
            }
            stats.sent();
            if write.write_all(&out).await.is_err() {
                continue;
            }
            let mut done = false;
            let mut failed = false;
            while !done {
                let mut on_frame = |frame: Frame<'_>| {
                    if let Frame::Text(p) = frame {
                        if find(p, &keys::ERROR).is_some() {
                            failed = true;
                        }
                        if find(p, &keys::LEAVE_RESPONSE).is_some() {
                            done = true;
                        }
                    }
                };
                let read =
                    tokio::time::timeout(Duration::from_secs(5), reader.read_some(&mut on_frame))
                        .await;
                if !matches!(read, Ok(true)) {
                    break;
                }
            }
            if failed || !done {
                stats.error();
            } else {
                stats.acked(Some(started));
            }
            let mut close = vec![0x88, 0x82, 0, 0, 0, 0];
            close.extend_from_slice(&1000u16.to_be_bytes());
            let _ = write.write_all(&close).await;
            cycle += 1;
        }
    });
}

/// One conversation of `inbox`: its customer and the agent it is assigned to.
pub struct InboxConversation {
    pub room: String,
    pub customer: Conn,
    pub agent: Conn,
    /// Another agent, mentioned in the agent's notes.
    pub colleague: Rc<str>,
}

/// `inbox`: a conversation's repeating pattern of 10 actions at `plan.rate` a second: 4
/// customer chats, 3 agent answers, 1 agent note mentioning a colleague, and a read receipt
/// from each side of the other's latest message. Every stored message also moves the
/// conversation on the inbox of every subscribed agent.
pub fn spawn_inbox_conversation(conversation: InboxConversation, plan: Plan, stats: Rc<Stats>) {
    const PATTERN: [u8; 10] = [b'c', b'a', b'c', b'n', b'r', b'c', b'a', b'R', b'c', b'a'];
    tokio::task::spawn_local(async move {
        let InboxConversation {
            room,
            customer,
            agent,
            colleague,
        } = conversation;
        let mut schedule = Schedule::new(plan.rate, plan.offset);
        let (mut customer_chats, mut agent_chats, mut step) = (0u64, 0u64, 0usize);
        loop {
            let due = schedule.next().await;
            if due >= plan.until || !customer.alive.get() || !agent.alive.get() {
                break;
            }
            let t = ns_of(&stats, due);
            match PATTERN[step % PATTERN.len()] {
                b'c' => {
                    customer_chats += 1;
                    let id = format!("c-{room}-{customer_chats}");
                    customer.send(&chat_frame(&customer.user, &room, t, plan.size, Some(&id)));
                    stats.sent();
                }
                b'a' => {
                    agent_chats += 1;
                    let id = format!("a-{room}-{agent_chats}");
                    agent.send(&chat_frame(&agent.user, &room, t, plan.size, Some(&id)));
                    stats.sent();
                }
                b'n' => {
                    let user = &agent.user;
                    agent.send(&format!(
                        r#"{{"code":"note","user_id":"{user}","room_id":"{room}","ref":"t{t}","data":{{"message":"t={t} @{colleague} please check","sender":"{user}","mentions":["{colleague}"]}}}}"#
                    ));
                    stats.request();
                }
                b'r' if agent_chats > 0 => {
                    let user = &customer.user;
                    customer.send(&format!(
                        r#"{{"code":"read_receipt","user_id":"{user}","room_id":"{room}","ref":"t{t}","data":{{"message_id":"a-{room}-{agent_chats}","sender":"{user}"}}}}"#
                    ));
                    stats.request();
                }
                b'R' if customer_chats > 0 => {
                    let user = &agent.user;
                    agent.send(&format!(
                        r#"{{"code":"read_receipt","user_id":"{user}","room_id":"{room}","ref":"t{t}","data":{{"message_id":"c-{room}-{customer_chats}","sender":"{user}"}}}}"#
                    ));
                    stats.request();
                }
                _ => {}
            }
            step += 1;
        }
    });
}
