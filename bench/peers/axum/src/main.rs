//! Reference server for the side-by-side benchmark, built the way most Rust chat servers are
//! built today: axum's WebSocket support (tokio-tungstenite underneath), a
//! `tokio::sync::broadcast` channel per room, serde_json for parsing and serializing.
//!
//! Protocol subset (as the minimal peer and the Node peers): `join` → `join_response` (ref
//! echoed), `chat` → the direct `chat_response` to the sender (ref echoed, `data: {seq, message}`)
//! plus one `chat_response` event without ref to every other member of the room, `ping` →
//! `ping_response`. No auth (the `token` query parameter is ignored), no storage.
//!
//! Each connection has one writer task owning the socket's sink, fed by an mpsc channel; every
//! joined room adds a task forwarding that room's broadcast into the channel (skipping the
//! connection's own messages). Each broadcast is serialized once and shared (`Utf8Bytes` is a
//! reference-counted buffer); the writer feeds whatever is queued and flushes once.
//!
//! `axum-peer [ADDR]` (default `127.0.0.1:9300`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

/// A broadcast: the sending connection's id and the serialized event.
type Event = (u64, Utf8Bytes);

struct Room {
    tx: broadcast::Sender<Event>,
    seq: u64,
}

#[derive(Default)]
struct AppState {
    rooms: Mutex<HashMap<String, Room>>,
    next_conn: AtomicU64,
}

#[derive(Deserialize)]
struct Incoming {
    code: String,
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    room_id: String,
    #[serde(rename = "ref")]
    reference: Option<String>,
    #[serde(default)]
    data: Data,
}

#[derive(Deserialize, Default)]
struct Data {
    message: Option<String>,
}

#[derive(Serialize)]
struct ChatData<'a> {
    seq: u64,
    message: &'a str,
}

#[derive(Serialize)]
struct Outgoing<'a, D: Serialize> {
    status: &'static str,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room_id: Option<&'a str>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
    data: D,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct ErrorData {
    error_code: &'static str,
    message: &'static str,
}

const ROOM_CAPACITY: usize = 4096;
const OUTBOX_CAPACITY: usize = 4096;

fn text<T: Serialize>(value: &T) -> Utf8Bytes {
    serde_json::to_string(value)
        .expect("serializable")
        .into()
}

async fn ws_handler(ws: WebSocketUpgrade, State(state): State<Arc<AppState>>) -> Response {
    ws.on_upgrade(move |socket| handle_socket(socket, state))
}

async fn handle_socket(socket: WebSocket, state: Arc<AppState>) {
    let id = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Utf8Bytes>(OUTBOX_CAPACITY);

    let writer = tokio::spawn(async move {
        while let Some(first) = out_rx.recv().await {
            if sink.feed(Message::Text(first)).await.is_err() {
                return;
            }
            while let Ok(more) = out_rx.try_recv() {
                if sink.feed(Message::Text(more)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });

    let mut forwarders: Vec<(String, tokio::task::JoinHandle<()>)> = Vec::new();
    while let Some(Ok(msg)) = stream.next().await {
        let body = match msg {
            Message::Text(body) => body,
            Message::Close(_) => break,
            _ => continue,
        };
        let Ok(req) = serde_json::from_str::<Incoming>(body.as_str()) else {
            let _ = out_tx
                .send(text(&Outgoing {
                    status: "error",
                    code: "error",
                    user_id: None,
                    room_id: None,
                    reference: None,
                    data: ErrorData { error_code: "BAD_REQUEST", message: "not a valid envelope" },
                }))
                .await;
            continue;
        };
        match req.code.as_str() {
            "join" => {
                if !forwarders.iter().any(|(room, _)| *room == req.room_id) {
                    let mut rx = {
                        let mut rooms = state.rooms.lock().unwrap();
                        rooms
                            .entry(req.room_id.clone())
                            .or_insert_with(|| Room { tx: broadcast::channel(ROOM_CAPACITY).0, seq: 0 })
                            .tx
                            .subscribe()
                    };
                    let out = out_tx.clone();
                    let task = tokio::spawn(async move {
                        loop {
                            match rx.recv().await {
                                Ok((from, event)) => {
                                    if from != id && out.send(event).await.is_err() {
                                        return;
                                    }
                                }
                                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                                Err(broadcast::error::RecvError::Closed) => return,
                            }
                        }
                    });
                    forwarders.push((req.room_id.clone(), task));
                }
                let reply = text(&Outgoing {
                    status: "success",
                    code: "join_response",
                    user_id: None,
                    room_id: Some(&req.room_id),
                    reference: req.reference.as_deref(),
                    data: Empty {},
                });
                if out_tx.send(reply).await.is_err() {
                    break;
                }
            }
            "chat" => {
                if !forwarders.iter().any(|(room, _)| *room == req.room_id) {
                    let _ = out_tx
                        .send(text(&Outgoing {
                            status: "error",
                            code: "chat_response",
                            user_id: None,
                            room_id: Some(&req.room_id),
                            reference: req.reference.as_deref(),
                            data: ErrorData { error_code: "NOT_JOINED", message: "join the room first" },
                        }))
                        .await;
                    continue;
                }
                let message = req.data.message.as_deref().unwrap_or_default();
                let (tx, seq) = {
                    let mut rooms = state.rooms.lock().unwrap();
                    let room = rooms.get_mut(&req.room_id).expect("joined room exists");
                    room.seq += 1;
                    (room.tx.clone(), room.seq)
                };
                let mut event = Outgoing {
                    status: "success",
                    code: "chat_response",
                    user_id: Some(&req.user_id),
                    room_id: Some(&req.room_id),
                    reference: None,
                    data: ChatData { seq, message },
                };
                let _ = tx.send((id, text(&event)));
                event.reference = req.reference.as_deref();
                if out_tx.send(text(&event)).await.is_err() {
                    break;
                }
            }
            "ping" => {
                let reply = text(&Outgoing {
                    status: "success",
                    code: "ping_response",
                    user_id: None,
                    room_id: None,
                    reference: req.reference.as_deref(),
                    data: Empty {},
                });
                if out_tx.send(reply).await.is_err() {
                    break;
                }
            }
            _ => {
                let _ = out_tx
                    .send(text(&Outgoing {
                        status: "error",
                        code: "error",
                        user_id: None,
                        room_id: Some(&req.room_id),
                        reference: req.reference.as_deref(),
                        data: ErrorData { error_code: "UNKNOWN_CODE", message: "unknown code" },
                    }))
                    .await;
            }
        }
    }

    for (_, task) in forwarders {
        task.abort();
    }
    writer.abort();
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9300".to_owned());
    let state = Arc::new(AppState::default());
    let app = Router::new().route("/ws", get(ws_handler)).with_state(state);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("axum-peer listening on {addr}");
    axum::serve(listener, app).await
}
