//! The minimal reference server: single-threaded, no storage, no auth, just `join`, `chat`
//! fan-out with the direct reply, and `ping`, doing the least work per delivered frame: each
//! broadcast is serialized once (as complete frame bytes) and appended to every member's output
//! buffer, and each connection is written once per event-loop turn. It is the yardstick the
//! gateway is measured against, not a product.
//!
//! `minimal-peer [ADDR]` (default `127.0.0.1:9100`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

struct Conn {
    out: RefCell<Vec<u8>>,
    ready: Notify,
}

impl Conn {
    fn push(&self, frame: &[u8]) {
        let mut out = self.out.borrow_mut();
        let was_empty = out.is_empty();
        out.extend_from_slice(frame);
        if was_empty {
            self.ready.notify_one();
        }
    }
}

#[derive(Default)]
struct Room {
    members: Vec<Rc<Conn>>,
    seq: u64,
}

type Rooms = Rc<RefCell<HashMap<Vec<u8>, Rc<RefCell<Room>>>>>;

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x81);
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=65535 => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The raw bytes of the JSON string value after `key` (escapes kept as they are).
fn string_after<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let start = find(json, key)? + key.len();
    let mut i = start;
    while i < json.len() {
        match json[i] {
            b'\\' => i += 2,
            b'"' => return Some(&json[start..i]),
            _ => i += 1,
        }
    }
    None
}

fn handle_message(conn: &Rc<Conn>, rooms: &Rooms, joined: &mut Vec<Rc<RefCell<Room>>>, msg: &[u8]) {
    let room_id = string_after(msg, b"\"room_id\":\"").unwrap_or_default();
    let user = string_after(msg, b"\"user_id\":\"").unwrap_or_default();
    let reference = string_after(msg, b"\"ref\":\"").unwrap_or_default();
    let mut reply = Vec::with_capacity(160);
    if find(msg, b"\"code\":\"join\"").is_some() {
        let room = rooms
            .borrow_mut()
            .entry(room_id.to_vec())
            .or_default()
            .clone();
        room.borrow_mut().members.push(conn.clone());
        joined.push(room);
        reply.extend_from_slice(
            b"{\"status\":\"success\",\"code\":\"join_response\",\"room_id\":\"",
        );
        reply.extend_from_slice(room_id);
        reply.extend_from_slice(b"\",\"ref\":\"");
        reply.extend_from_slice(reference);
        reply.extend_from_slice(b"\",\"data\":{}}");
        conn.push(&frame(&reply));
    } else if find(msg, b"\"code\":\"chat\"").is_some() {
        let Some(room) = rooms.borrow().get(room_id).cloned() else {
            return;
        };
        let mut room = room.borrow_mut();
        room.seq += 1;
        let seq = room.seq;
        let text = string_after(msg, b"\"message\":\"").unwrap_or_default();
        let mut event = Vec::with_capacity(128 + text.len());
        event.extend_from_slice(
            b"{\"status\":\"success\",\"code\":\"chat_response\",\"user_id\":\"",
        );
        event.extend_from_slice(user);
        event.extend_from_slice(b"\",\"room_id\":\"");
        event.extend_from_slice(room_id);
        event.extend_from_slice(b"\",\"data\":{\"seq\":");
        event.extend_from_slice(seq.to_string().as_bytes());
        event.extend_from_slice(b",\"message\":\"");
        event.extend_from_slice(text);
        event.extend_from_slice(b"\"}}");
        let broadcast = frame(&event);
        for member in &room.members {
            if !Rc::ptr_eq(member, conn) {
                member.push(&broadcast);
            }
        }
        // The direct reply: the same event with the sender's ref.
        event.truncate(event.len() - 1);
        event.extend_from_slice(b",\"ref\":\"");
        event.extend_from_slice(reference);
        event.extend_from_slice(b"\"}");
        conn.push(&frame(&event));
    } else if find(msg, b"\"code\":\"ping\"").is_some() {
        reply.extend_from_slice(b"{\"status\":\"success\",\"code\":\"ping_response\",\"ref\":\"");
        reply.extend_from_slice(reference);
        reply.extend_from_slice(b"\",\"data\":{}}");
        conn.push(&frame(&reply));
    }
}

/// Size of the one read buffer every connection reads into (the server is single-threaded, and
/// no connection holds it across an await).
const SCRATCH: usize = 64 * 1024;

async fn serve(
    stream: TcpStream,
    rooms: Rooms,
    scratch: Rc<RefCell<Vec<u8>>>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut read, mut write) = stream.into_split();
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // The upgrade.
    let head_end = loop {
        let n = read.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        if let Some(at) = find(&buf[..len], b"\r\n\r\n") {
            break at + 4;
        }
        if len == buf.len() {
            return Ok(());
        }
    };
    let key = buf[..head_end]
        .split(|&b| b == b'\n')
        .find(|line| line.to_ascii_lowercase().starts_with(b"sec-websocket-key:"))
        .map(|line| line[18..].trim_ascii().to_vec())
        .unwrap_or_default();
    let mut sha = Sha1::new();
    sha.update(&key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    write.write_all(response.as_bytes()).await?;
    // Between reads a connection keeps only the bytes of a frame that has not fully arrived.
    let mut partial = buf[head_end..len].to_vec();
    drop(buf);

    let conn = Rc::new(Conn {
        out: RefCell::new(Vec::new()),
        ready: Notify::new(),
    });
    let writer_conn = conn.clone();
    let writer = tokio::task::spawn_local(async move {
        let mut pending = Vec::new();
        loop {
            writer_conn.ready.notified().await;
            // Let every reader of this loop turn append first: one write per turn.
            tokio::task::yield_now().await;
            std::mem::swap(&mut pending, &mut *writer_conn.out.borrow_mut());
            if write.write_all(&pending).await.is_err() {
                break;
            }
            pending.clear();
        }
    });

    let mut joined = Vec::new();
    'read: loop {
        read.readable().await?;
        let mut buf = scratch.borrow_mut();
        let mut len = partial.len();
        buf[..len].copy_from_slice(&partial);
        match read.try_read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        let mut start = 0;
        loop {
            let avail = &mut buf[start..len];
            if avail.len() < 6 {
                break;
            }
            let opcode = avail[0] & 0x0f;
            let (header, payload_len) = match avail[1] & 0x7f {
                126 => (8, u16::from_be_bytes([avail[2], avail[3]]) as usize),
                127 => {
                    if avail.len() < 14 {
                        break;
                    }
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&avail[2..10]);
                    (14, u64::from_be_bytes(b) as usize)
                }
                n => (6, n as usize),
            };
            if avail.len() < header + payload_len {
                if header + payload_len > SCRATCH {
                    break 'read;
                }
                break;
            }
            let mask = [
                avail[header - 4],
                avail[header - 3],
                avail[header - 2],
                avail[header - 1],
            ];
            let payload = &mut avail[header..header + payload_len];
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i & 3];
            }
            match opcode {
                0x1 => handle_message(&conn, &rooms, &mut joined, payload),
                0x8 => break 'read,
                _ => {}
            }
            start += header + payload_len;
        }
        partial = buf[start..len].to_vec();
    }
    writer.abort();
    for room in joined {
        room.borrow_mut().members.retain(|m| !Rc::ptr_eq(m, &conn));
    }
    Ok(())
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(&addr).await?;
        eprintln!("minimal-peer listening on {addr}");
        let rooms: Rooms = Rc::default();
        let scratch = Rc::new(RefCell::new(vec![0u8; SCRATCH]));
        loop {
            let (stream, _) = listener.accept().await?;
            let rooms = rooms.clone();
            let scratch = scratch.clone();
            tokio::task::spawn_local(async move {
                let _ = serve(stream, rooms, scratch).await;
            });
        }
    })
}
