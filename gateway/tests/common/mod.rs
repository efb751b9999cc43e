//! Shared helpers for the integration tests: a real gateway on port 0 and a client built on
//! tokio-tungstenite (an independent WebSocket implementation, not the gateway's codec).
#![allow(dead_code, unreachable_pub)]

pub mod inbox;
mod process;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway::auth::{now_secs, Claims, KeySource, Role, Verifier};
use gateway::config::Config;
use gateway::server::Gateway;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

// Not every test binary runs the real process.
#[allow(unused_imports)]
pub use process::*;

pub const SECRET: &str = "integration-test-secret";

pub struct TestServer {
    pub gateway: Option<Gateway>,
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
}

/// The store a test's gateway runs on: the embedded one in the test's directory, or, when
/// `GATEWAY_TEST_STORE` holds a URL template such as
/// `scylla://127.0.0.1:9042/{keyspace}?consistency=one`, a keyspace of its own on that node,
/// named after the test's directory (so a restart on the same directory finds the same data).
pub fn test_store_url(dir: &std::path::Path) -> Option<String> {
    let template = std::env::var("GATEWAY_TEST_STORE").ok()?;
    let name: String = dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    Some(template.replace("{keyspace}", &format!("t{name}")))
}

/// Creates the schema of the test's store, when it is a database server's.
pub async fn prepare_test_store(dir: &std::path::Path) {
    if let Some(url) = test_store_url(dir) {
        storage::migrate(&url, &storage::Options::default())
            .await
            .unwrap_or_else(|e| panic!("migrating {url}: {e}"));
    }
}

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.data_dir = dir.to_path_buf();
    config.store = test_store_url(dir);
    config.shards = 2;
    config.jwt_secret = Some(SECRET.to_owned());
    config
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, tweak).await
    }

    pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestServer {
        prepare_test_store(dir.path()).await;
        let mut config = test_config(dir.path());
        tweak(&mut config);
        // As the binary does: the key, algorithm, audience and issuer all come from the config.
        let (verifier, dev_secret) = gateway::verifier_from_config(&config).unwrap();
        assert!(
            dev_secret.is_none(),
            "test servers run with a configured key"
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = Gateway::start(config, verifier, listener).await.unwrap();
        let addr = gateway.local_addr();
        TestServer {
            gateway: Some(gateway),
            addr,
            dir,
        }
    }

    /// Graceful shutdown; returns the data directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.gateway.take().unwrap().shutdown().await.unwrap();
        self.dir
    }

    pub fn url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={}", self.addr, token)
    }

    pub async fn connect(&self, user: &str, tenant: &str, role: Role) -> Client {
        Client::connect(&self.url(&token(user, tenant, role)), user).await
    }

    pub async fn metrics(&self) -> String {
        http_get(self.addr, "/metrics").await.1
    }
}

pub fn claims(user: &str, tenant: &str, role: Role, exp: u64) -> Claims {
    Claims {
        sub: user.to_owned(),
        tenant: tenant.to_owned(),
        role,
        exp,
        name: None,
        aud: None,
        iss: None,
    }
}

pub fn token_with(claims: &Claims, secret: &str) -> String {
    Verifier::new(KeySource::Secret(secret.as_bytes()), &[], &[], 0)
        .unwrap()
        .mint(claims)
        .unwrap()
}

pub fn token(user: &str, tenant: &str, role: Role) -> String {
    token_with(&claims(user, tenant, role, now_secs() + 3600), SECRET)
}

/// A throwaway key of `tests/keys`.
pub fn key_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

/// A raw HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await
}

pub async fn http_request(addr: std::net::SocketAddr, raw: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("http response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub user: String,
    pub connected: Value,
}

/// How a connection ended, as seen by the client.
#[derive(Debug, PartialEq)]
pub enum Closed {
    Code(u16),
    NoCloseFrame,
}

impl Client {
    pub async fn connect(url: &str, user: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url.into_client_request().unwrap())
            .await
            .expect("websocket handshake");
        let mut client = Client {
            ws,
            user: user.to_owned(),
            connected: Value::Null,
        };
        client.connected = client.recv().await;
        assert_eq!(
            client.connected["code"], "connected",
            "{}",
            client.connected
        );
        client
    }

    pub async fn send(&mut self, value: Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// Next JSON frame (pings are answered by tungstenite).
    pub async fn recv(&mut self) -> Value {
        self.recv_within(Duration::from_secs(10))
            .await
            .expect("a frame within 10s")
    }

    pub async fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match next {
                Some(Ok(Message::Text(text))) => return Some(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Skips frames until one with this code arrives.
    pub async fn recv_code(&mut self, code: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["code"] == code {
                return v;
            }
        }
    }

    /// Asserts nothing arrives for a while.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(v) = self.recv_within(wait).await {
            panic!("expected no frame, got {v}");
        }
    }

    /// Reads until the server closes; returns the close code.
    pub async fn closed(&mut self) -> Closed {
        loop {
            match tokio::time::timeout(Duration::from_secs(15), self.ws.next()).await {
                Err(_) => panic!("connection not closed within 15s"),
                Ok(Some(Ok(Message::Close(Some(frame))))) => {
                    return Closed::Code(u16::from(frame.code))
                }
                Ok(Some(Ok(Message::Close(None)))) => return Closed::Code(1005),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return Closed::NoCloseFrame,
            }
        }
    }

    pub async fn request(&mut self, code: &str, room: Option<&str>, data: Value) -> Value {
        let reference = format!("r-{}", ulid::Ulid::new());
        let mut frame = json!({"code": code, "user_id": self.user, "data": data, "ref": reference});
        if let Some(room) = room {
            frame["room_id"] = json!(room);
        }
        self.send(frame).await;
        loop {
            let v = self.recv().await;
            if v["ref"] == reference.as_str() {
                return v;
            }
        }
    }

    pub async fn join(&mut self, room: &str) -> Value {
        let v = self.request("join", Some(room), json!({})).await;
        assert_eq!(v["status"], "success", "{v}");
        v
    }

    pub async fn chat(&mut self, room: &str, text: &str) -> Value {
        let user = self.user.clone();
        self.request("chat", Some(room), json!({"message": text, "sender": user}))
            .await
    }
}

pub fn close_code(code: u16) -> CloseCode {
    CloseCode::from(code)
}

// ---------------------------------------------------------------------------------------------
// Added helpers (protocol and error tests).

/// A raw HTTP/1.1 POST with an optional bearer token and a JSON body; returns (status, body).
pub async fn http_post(
    addr: std::net::SocketAddr,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = bearer.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let raw = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http_request(addr, &raw).await
}

/// Uploads a small file through `POST /api/v1/files` (for `room` if given); returns its id.
#[allow(dead_code)]
pub async fn upload_file(
    server: &TestServer,
    bearer: &str,
    name: &str,
    content_type: &str,
    room: Option<&str>,
) -> String {
    let part = reqwest::multipart::Part::bytes(b"%PDF-1.4 test bytes".to_vec())
        .file_name(name.to_owned())
        .mime_str(content_type)
        .unwrap();
    let mut form = reqwest::multipart::Form::new().part("file", part);
    if let Some(room) = room {
        form = form.text("room_id", room.to_owned());
    }
    let response = reqwest::Client::new()
        .post(format!("http://{}/api/v1/files", server.addr))
        .bearer_auth(bearer)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let file: Value = response.json().await.unwrap();
    file["file_id"].as_str().unwrap().to_owned()
}

/// Creates a room through `POST /api/rooms`; panics unless it answers 200 or 201.
pub async fn create_room(server: &TestServer, bearer: &str, body: Value) -> Value {
    let (status, text) =
        http_post(server.addr, "/api/rooms", Some(bearer), &body.to_string()).await;
    assert!(status == 200 || status == 201, "{status} {text}");
    serde_json::from_str(&text).unwrap()
}

/// An unsigned `alg: none` token carrying the given claims.
pub fn alg_none_token(claims: &Claims) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64.encode(serde_json::to_vec(claims).unwrap());
    format!("{header}.{body}.")
}

/// The HTTP status of a refused WebSocket handshake (panics when the upgrade succeeds or fails
/// some other way).
pub async fn handshake_status(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> u16 {
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => panic!("the handshake was expected to be refused"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP error, got {other:?}"),
    }
}

impl Client {
    /// Every JSON frame that arrives within `wait`.
    pub async fn drain(&mut self, wait: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Some(v) = self
            .recv_within(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            out.push(v);
        }
        out
    }

    /// Sends a raw text frame (not necessarily JSON).
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_owned())).await.unwrap();
    }

    /// Sends `ping` and waits for its reply; proves the connection still serves requests.
    pub async fn ping(&mut self) -> Value {
        let v = self.request("ping", None, json!({})).await;
        assert_eq!(v["status"], "success", "{v}");
        assert_eq!(v["code"], "ping_response", "{v}");
        v
    }
}

/// A WebSocket client over a plain TCP socket, for what tungstenite will not send or for a
/// peer that never reads: it completes the upgrade and then only does what it is told.
pub struct RawClient {
    pub reader: tokio::net::tcp::OwnedReadHalf,
    /// `None` once a test took it (to write from another task).
    pub writer: Option<tokio::net::tcp::OwnedWriteHalf>,
    /// Bytes read but not yet consumed.
    pub buf: Vec<u8>,
}

/// One frame as the raw client read it.
#[derive(Debug)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// A masked frame header announcing `len` payload bytes (with an all-zero mask, so the payload
/// goes on the wire as written).
pub fn raw_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut header = vec![(u8::from(fin) << 7) | opcode];
    match len {
        0..=125 => header.push(0x80 | len as u8),
        126..=65535 => {
            header.push(0x80 | 126);
            header.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            header.push(0x80 | 127);
            header.extend_from_slice(&len.to_be_bytes());
        }
    }
    header.extend_from_slice(&[0, 0, 0, 0]);
    header
}

/// The WebSocket upgrade request for `GET /ws?token=…`.
pub fn upgrade_request(token: &str) -> String {
    format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Reads an HTTP response head (each read within `wait`); returns the head and the bytes that
/// followed it.
pub async fn read_response_head(stream: &mut TcpStream, wait: Duration) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(wait, stream.read(&mut chunk))
            .await
            .expect("a response head in time")
            .unwrap();
        assert!(n > 0, "closed before the end of the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    (head, buf)
}

impl RawClient {
    /// Upgrades `GET /ws?token=…`; panics unless the server answers 101.
    pub async fn connect(addr: std::net::SocketAddr, token: &str) -> RawClient {
        RawClient::connect_with_recv_buffer(addr, token, None).await
    }

    /// As [`RawClient::connect`], with the socket's receive buffer set to `recv_buffer` bytes
    /// (a small one makes a peer that stops reading fill up quickly).
    pub async fn connect_with_recv_buffer(
        addr: std::net::SocketAddr,
        token: &str,
        recv_buffer: Option<u32>,
    ) -> RawClient {
        use tokio::io::AsyncWriteExt;
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let mut stream = socket.connect(addr).await.unwrap();
        stream
            .write_all(upgrade_request(token).as_bytes())
            .await
            .unwrap();
        let (head, buf) = read_response_head(&mut stream, Duration::from_secs(10)).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let (reader, writer) = stream.into_split();
        RawClient {
            reader,
            writer: Some(writer),
            buf,
        }
    }

    /// Writes raw bytes.
    pub async fn write(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let writer = self.writer.as_mut().expect("the writer was taken");
        writer.write_all(bytes).await.unwrap();
    }

    /// Writes one complete masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mut bytes = raw_header(fin, opcode, payload.len() as u64);
        bytes.extend_from_slice(payload);
        self.write(&bytes).await;
    }

    /// Writes one text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, 0x1, text.as_bytes()).await;
    }

    /// Reads the next frame; `None` when the connection ends (or nothing arrives in `wait`).
    pub async fn read_frame(&mut self, wait: Duration) -> Option<RawFrame> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                let len_code = (self.buf[1] & 0x7f) as usize;
                let parsed = match len_code {
                    126 if self.buf.len() >= 4 => {
                        Some((4, u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize))
                    }
                    127 if self.buf.len() >= 10 => Some((
                        10,
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                    )),
                    126 | 127 => None,
                    n => Some((2, n)),
                };
                if let Some((header, len)) = parsed {
                    if self.buf.len() >= header + len {
                        let frame = RawFrame {
                            fin: self.buf[0] & 0x80 != 0,
                            opcode: self.buf[0] & 0x0f,
                            payload: self.buf[header..header + len].to_vec(),
                        };
                        self.buf.drain(..header + len);
                        return Some(frame);
                    }
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = match tokio::time::timeout_at(deadline, self.reader.read(&mut chunk)).await {
                Err(_) | Ok(Err(_)) | Ok(Ok(0)) => return None,
                Ok(Ok(n)) => n,
            };
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Writes several text frames with a single write, so the server reads them together.
    pub async fn send_texts(&mut self, texts: &[String]) {
        let mut bytes = Vec::new();
        for text in texts {
            bytes.extend(raw_header(true, 0x1, text.len() as u64));
            bytes.extend_from_slice(text.as_bytes());
        }
        self.write(&bytes).await;
    }

    /// The next frame with `opcode`, skipping any other; `None` when nothing comes in `wait` or
    /// the connection ends.
    pub async fn read_frame_of(&mut self, opcode: u8, wait: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.read_frame(left).await?;
            if frame.opcode == opcode {
                return Some(frame);
            }
        }
    }

    /// The next text frame as JSON, skipping control frames; `None` when nothing comes in
    /// `wait` or the connection ends.
    pub async fn recv_json(&mut self, wait: Duration) -> Option<Value> {
        let frame = self.read_frame_of(0x1, wait).await?;
        Some(serde_json::from_slice(&frame.payload).unwrap())
    }

    /// Reads frames until a close frame and returns its code (`None` when the connection ended
    /// without one or nothing came within `wait`).
    pub async fn close_code(&mut self, wait: Duration) -> Option<u16> {
        let frame = self.read_frame_of(0x8, wait).await?;
        Some(if frame.payload.len() >= 2 {
            u16::from_be_bytes([frame.payload[0], frame.payload[1]])
        } else {
            1005
        })
    }
}

/// Writes a note straight into a stopped gateway's store (as the `note` code would)
/// and returns it as stored.
pub async fn store_note(
    dir: &std::path::Path,
    tenant: &str,
    room: &str,
    sender: &str,
    text: &str,
    message_id: Option<&str>,
) -> storage::Message {
    use storage::Store;
    let store = storage::open(&test_config(dir).store_url()).unwrap();
    let key = storage::RoomKey::new(tenant, room);
    // Numbered after what is stored, as the room's owner does when it loads the room.
    let seq = store
        .room(&key)
        .await
        .unwrap()
        .expect("room exists")
        .last_seq
        + 1;
    let mut note = storage::NewMessage::text(&key, seq, sender, text);
    note.sender_type = storage::SenderType::Agent;
    note.direction = storage::Direction::Note;
    if let Some(id) = message_id {
        note.message_id = id.to_owned();
    }
    let stored = store.append(note).await.unwrap();
    store.close().await.unwrap();
    stored.message
}
