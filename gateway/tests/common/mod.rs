//! Shared helpers for the integration tests: a real gateway on port 0 and a client built on
//! tokio-tungstenite (an independent WebSocket implementation, not the gateway's codec).
#![allow(dead_code, unreachable_pub)]

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

pub const SECRET: &str = "integration-test-secret";

pub struct TestServer {
    pub gateway: Option<Gateway>,
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
}

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.data_dir = dir.to_path_buf();
    config.store = None;
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
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let verifier = Verifier::new(KeySource::Secret(SECRET.as_bytes()), &[], &[], 0).unwrap();
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
