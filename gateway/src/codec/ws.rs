//! WebSocket framing for what the server sends: unmasked frames, so one encoded frame (header
//! and payload together) can be shared by every recipient.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest header of an unmasked frame: 2 bytes + 8 bytes of extended length.
pub const MAX_HEADER_LEN: usize = 10;

/// WebSocket opcodes the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

/// Length of the header for a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Writes the header of a final, unmasked frame into `out` (which must be `header_len(len)`
/// bytes long).
pub fn write_header(out: &mut [u8], opcode: OpCode, len: usize) {
    out[0] = 0x80 | opcode as u8;
    match len {
        0..=125 => out[1] = len as u8,
        126..=65535 => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// A complete frame with the given payload.
pub fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let h = header_len(payload.len());
    let mut out = BytesMut::with_capacity(h + payload.len());
    out.resize(h, 0);
    write_header(&mut out, opcode, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// A close frame with a status code and a reason (truncated to fit the 125-byte limit on a
/// control frame's payload).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut reason = reason.as_bytes();
    if reason.len() > 123 {
        let mut cut = 123;
        while std::str::from_utf8(&reason[..cut]).is_err() {
            cut -= 1;
        }
        reason = &reason[..cut];
    }
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason);
    frame(OpCode::Close, &payload)
}

/// A buffer that holds room for the largest header in front of the payload, so a payload can be
/// serialized straight into it and framed without a copy.
pub struct FrameBuf {
    buf: BytesMut,
}

impl FrameBuf {
    pub fn with_capacity(payload_capacity: usize) -> Self {
        let mut buf = BytesMut::with_capacity(MAX_HEADER_LEN + payload_capacity);
        buf.resize(MAX_HEADER_LEN, 0);
        FrameBuf { buf }
    }

    /// The payload part, for serializers to write into.
    pub fn payload_writer(&mut self) -> bytes::buf::Writer<&mut BytesMut> {
        (&mut self.buf).writer()
    }

    /// Writes the header in front of the payload and returns the complete frame.
    pub fn finish(mut self, opcode: OpCode) -> Bytes {
        let len = self.buf.len() - MAX_HEADER_LEN;
        let h = header_len(len);
        let start = MAX_HEADER_LEN - h;
        write_header(&mut self.buf[start..MAX_HEADER_LEN], opcode, len);
        self.buf.freeze().slice(start..)
    }
}

/// Payload of a frame produced by this module (skipping the header), for tests and tools.
pub fn payload_of(frame: &[u8]) -> &[u8] {
    let len_code = frame[1] & 0x7f;
    let start = match len_code {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    &frame[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_use_the_shortest_length_form() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 1 << 20] {
            let payload = vec![b'a'; len];
            let f = frame(OpCode::Text, &payload);
            assert_eq!(f.len(), header_len(len) + len);
            assert_eq!(f[0], 0x81);
            assert_eq!(payload_of(&f), &payload[..]);
        }
    }

    #[test]
    fn frame_buf_matches_frame() {
        use std::io::Write;
        for len in [3usize, 200, 70_000] {
            let payload = vec![b'x'; len];
            let mut fb = FrameBuf::with_capacity(16);
            fb.payload_writer().write_all(&payload).unwrap();
            assert_eq!(fb.finish(OpCode::Text), frame(OpCode::Text, &payload));
        }
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let f = close_frame(1013, &"é".repeat(100));
        assert!(f.len() <= 2 + 125);
        assert!(std::str::from_utf8(&payload_of(&f)[2..]).is_ok());
    }
}
