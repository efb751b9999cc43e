//! A minimal WebSocket client for load generation: a hand-written upgrade, masked client
//! frames, and a receive path that decodes only frame headers and finds what it needs with a
//! byte search, allocating nothing per frame.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use memchr::memmem::Finder;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

/// Size of each read from the socket.
const READ_CHUNK: usize = 64 * 1024;

/// How envelopes travel over the WebSocket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// One JSON envelope per text frame, path `/ws?token=…` (the gateway).
    #[default]
    Ws,
    /// Socket.IO v4 over the Engine.IO websocket transport: envelopes travel as
    /// `42["message",<json>]`, Engine.IO pings (`2`) are answered with `3`.
    Socketio,
}

/// Socket.IO event prefix and suffix around one JSON envelope.
const SOCKETIO_PREFIX: &[u8] = b"42[\"message\",";
const SOCKETIO_SUFFIX: &[u8] = b"]";

impl Protocol {
    /// The upgrade request's path and query for a user whose token is `token`.
    pub fn path(self, token: &str) -> String {
        match self {
            Protocol::Ws => format!("/ws?token={token}"),
            Protocol::Socketio => {
                format!("/socket.io/?EIO=4&transport=websocket&token={token}")
            }
        }
    }

    /// Appends one client text frame carrying the JSON envelope `json`.
    pub fn encode(self, out: &mut Vec<u8>, json: &[u8]) {
        match self {
            Protocol::Ws => encode_text(out, json),
            Protocol::Socketio => encode_text_parts(out, &[SOCKETIO_PREFIX, json, SOCKETIO_SUFFIX]),
        }
    }
}

/// Connects from `source` (a 127.0.0.x address spreads connections over more source ports)
/// and completes the WebSocket upgrade.
pub async fn connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    path_and_query: &str,
) -> std::io::Result<TcpStream> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let mut stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // Read the response head byte-wise-ish: it is small, and anything after it belongs to
    // the frame reader, so stop exactly at the blank line.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 || head.len() > 8192 {
            return Err(std::io::Error::other("handshake: connection closed"));
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        let status = String::from_utf8_lossy(&head[..head.len().min(12)]).into_owned();
        return Err(std::io::Error::other(format!(
            "handshake refused: {status}"
        )));
    }
    Ok(stream)
}

/// Appends one masked text frame to `out`. The mask key is zero, which RFC 6455 allows and
/// spares the generator the XOR pass (the server unmasks as usual).
pub fn encode_text(out: &mut Vec<u8>, payload: &[u8]) {
    encode_text_parts(out, &[payload]);
}

/// Like [`encode_text`], with the payload given as consecutive parts (no joining copy).
pub fn encode_text_parts(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(len + 14);
    out.push(0x81);
    match len {
        0..=125 => out.push(0x80 | len as u8),
        126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// A pong for a server ping (empty payload echoes are enough for the gateway's pings).
pub fn encode_pong(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x8A);
    out.push(0x80 | payload.len().min(125) as u8);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&payload[..payload.len().min(125)]);
}

/// One decoded server frame, borrowed from the read buffer.
pub enum Frame<'a> {
    Text(&'a [u8]),
    Ping(&'a [u8]),
    Close(u16),
    Other,
}

/// Reads frames in large chunks and hands them out without copying.
pub struct FrameReader {
    read: OwnedReadHalf,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    pub fn new(read: OwnedReadHalf) -> Self {
        FrameReader {
            read,
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
        }
    }

    /// Calls `on_frame` for every complete frame; returns false at end of stream or on a read
    /// error, after the frames that arrived.
    pub async fn read_some(&mut self, on_frame: &mut impl FnMut(Frame<'_>)) -> bool {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.buf.len() - self.end < 1024 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let grow = self.buf.len();
            self.buf.resize(grow * 2, 0);
        }
        let n = match self.read.read(&mut self.buf[self.end..]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        self.end += n;
        loop {
            let available = &self.buf[self.start..self.end];
            if available.len() < 2 {
                break;
            }
            let opcode = available[0] & 0x0f;
            let (header, len) = match available[1] & 0x7f {
                126 if available.len() >= 4 => {
                    (4, u16::from_be_bytes([available[2], available[3]]) as usize)
                }
                127 if available.len() >= 10 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&available[2..10]);
                    (10, u64::from_be_bytes(b) as usize)
                }
                126 | 127 => break,
                n => (2, n as usize),
            };
            if available.len() < header + len {
                if header + len > self.buf.len() {
                    // Make room for a frame bigger than the buffer.
                    let needed = header + len;
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                    self.buf.resize(needed.next_power_of_two(), 0);
                }
                break;
            }
            let payload = &available[header..header + len];
            on_frame(match opcode {
                0x1 => Frame::Text(payload),
                0x9 => Frame::Ping(payload),
                0x8 => Frame::Close(if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                }),
                _ => Frame::Other,
            });
            self.start += header + len;
        }
        true
    }
}

/// Splits a connected stream into the reader and the write half.
pub fn split(stream: TcpStream) -> (FrameReader, OwnedWriteHalf) {
    let (read, write) = stream.into_split();
    (FrameReader::new(read), write)
}

/// The keys looked for in every received frame, each with its SIMD searcher built once: a
/// plain byte-by-byte search costs about as much per byte as receiving the byte, and it is
/// done several times per frame.
pub mod keys {
    use std::sync::LazyLock;

    use memchr::memmem::Finder;

    type Key = LazyLock<Finder<'static>>;

    pub static REF: Key = LazyLock::new(|| Finder::new(b"\"ref\":\"t"));
    pub static ERROR: Key = LazyLock::new(|| Finder::new(b"\"status\":\"error\""));
    pub static CHAT_RESPONSE: Key = LazyLock::new(|| Finder::new(b"\"code\":\"chat_response\""));
    pub static LEAVE_RESPONSE: Key = LazyLock::new(|| Finder::new(b"\"code\":\"leave_response\""));
    pub static MESSAGE_TIME: Key = LazyLock::new(|| Finder::new(b"\"message\":\"t="));
    pub static CONVERSATION_RESPONSE: Key =
        LazyLock::new(|| Finder::new(b"\"code\":\"conversation_response\""));
    pub static NOTIFICATION_RESPONSE: Key =
        LazyLock::new(|| Finder::new(b"\"code\":\"notification_response\""));
}

/// Position of `key` in `haystack`.
pub fn find(haystack: &[u8], key: &Finder<'_>) -> Option<usize> {
    key.find(haystack)
}

/// The unsigned integer right after `key` (e.g. `"seq":`), if any.
pub fn number_after(haystack: &[u8], key: &Finder<'_>) -> Option<u64> {
    let at = find(haystack, key)? + key.needle().len();
    let digits = haystack[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for d in digits {
        value = value.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
        any = true;
    }
    any.then_some(value)
}

/// A short sleep helper for ramp-up pacing.
pub async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_numbers_after_keys() {
        let frame = br#"{"code":"chat_response","data":{"seq":42,"message":"t=123456 xx"}}"#;
        assert_eq!(number_after(frame, &Finder::new(b"\"seq\":")), Some(42));
        assert_eq!(number_after(frame, &keys::MESSAGE_TIME), Some(123456));
        assert_eq!(number_after(frame, &Finder::new(b"\"nope\":")), None);
        assert_eq!(find(frame, &keys::CHAT_RESPONSE), Some(1));
        assert_eq!(find(frame, &keys::ERROR), None);
    }

    #[test]
    fn encodes_masked_frames_of_every_length_form() {
        for len in [0usize, 125, 126, 70_000] {
            let mut out = Vec::new();
            encode_text(&mut out, &vec![b'a'; len]);
            let header = match len {
                0..=125 => 2,
                126..=65535 => 4,
                _ => 10,
            };
            assert_eq!(out.len(), header + 4 + len);
            assert_eq!(out[1] & 0x80, 0x80);
        }
    }

    #[test]
    fn wraps_envelopes_for_socketio() {
        let json = br#"{"code":"ping","user_id":"u","data":{},"ref":"t1"}"#;
        let mut plain = Vec::new();
        Protocol::Ws.encode(&mut plain, json);
        let mut expected = Vec::new();
        encode_text(&mut expected, json);
        assert_eq!(plain, expected);

        let mut wrapped = Vec::new();
        Protocol::Socketio.encode(&mut wrapped, json);
        let payload = [&b"42[\"message\","[..], json, b"]"].concat();
        let mut expected = Vec::new();
        encode_text(&mut expected, &payload);
        assert_eq!(wrapped, expected);
        assert_eq!(&wrapped[6..], &payload[..]);
        assert_eq!(wrapped[1], 0x80 | payload.len() as u8);

        // Past the 125-byte form the length header grows with the wrapper counted in.
        let long = vec![b'x'; 120];
        let mut wrapped = Vec::new();
        Protocol::Socketio.encode(&mut wrapped, &long);
        assert_eq!(wrapped[1], 0x80 | 126);
        assert_eq!(u16::from_be_bytes([wrapped[2], wrapped[3]]), 134);
        assert!(wrapped.ends_with(b"xx]"));
    }

    #[test]
    fn socketio_paths() {
        assert_eq!(Protocol::Ws.path("abc"), "/ws?token=abc");
        assert!(Protocol::Socketio
            .path("abc")
            .starts_with("/socket.io/?EIO=4&transport=websocket"));
    }
}
