//! WebSocket framing (RFC 6455), without I/O. Server frames are unmasked, so one encoded frame
//! (header and payload together) can be shared by every recipient. Client frames are decoded
//! from whatever bytes have arrived: [`decode_head`] checks a header against the protocol and the
//! size limit before anything is buffered for the payload, and [`unmask`] unmasks it in place.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest header of an unmasked frame: 2 bytes + 8 bytes of extended length.
pub const MAX_HEADER_LEN: usize = 10;

/// WebSocket opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    /// The opcode of a frame's first byte; `None` for the reserved ones.
    pub fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong: never fragmented, at most 125 bytes of payload.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Why the connection must be closed: the close code and a short reason.
pub type CloseWith = (u16, &'static str);

/// The header of a frame from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHead {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: [u8; 4],
    /// Bytes of header before the payload.
    pub header_len: usize,
    pub payload_len: usize,
}

impl ClientHead {
    /// Header and payload together.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Decodes the header of the client frame at the start of `buf`: `Ok(None)` until enough bytes
/// have arrived for the whole header. Fails with the close code the peer gets: `1002` for a
/// protocol violation (reserved bits or opcode, an unmasked frame, a fragmented or oversized
/// control frame, a 64-bit length with its top bit set), `1009` for a payload over
/// `max_payload`, so nothing is ever buffered for a frame that will be refused.
pub fn decode_head(buf: &[u8], max_payload: usize) -> Result<Option<ClientHead>, CloseWith> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err((1002, "reserved bits set"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_bits(b0 & 0x0f).ok_or((1002, "reserved opcode"))?;
    if b1 & 0x80 == 0 {
        return Err((1002, "client frames must be masked"));
    }
    let (extra, len_code) = match b1 & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(usize::from(n))),
    };
    let header_len = 2 + extra + 4;
    if opcode.is_control() && (!fin || extra > 0) {
        return Err(if fin {
            (1002, "control frame over 125 bytes")
        } else {
            (1002, "fragmented control frame")
        });
    }
    if buf.len() < header_len {
        return Ok(None);
    }
    let payload_len = match len_code {
        Some(n) => n,
        None if extra == 2 => usize::from(u16::from_be_bytes([buf[2], buf[3]])),
        None => {
            let n = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if n >> 63 != 0 {
                return Err((1002, "frame length has its top bit set"));
            }
            usize::try_from(n).unwrap_or(usize::MAX)
        }
    };
    if payload_len > max_payload {
        return Err((1009, "frame too big"));
    }
    let mask = buf[header_len - 4..header_len].try_into().expect("4 bytes");
    Ok(Some(ClientHead {
        fin,
        opcode,
        mask,
        header_len,
        payload_len,
    }))
}

/// Unmasks a client payload in place (RFC 6455 §5.3), eight bytes at a time.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk[..].try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// Checks a close frame's payload from a client: empty, or a code a peer may send followed by
/// a UTF-8 reason.
pub fn check_close_payload(payload: &[u8]) -> Result<(), CloseWith> {
    match payload {
        [] => Ok(()),
        [_] => Err((1002, "close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err((1002, "invalid close code"));
            }
            std::str::from_utf8(reason).map_err(|_| (1007, "invalid utf-8 in close reason"))?;
            Ok(())
        }
    }
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

    /// A masked client frame, as a client library would send it.
    fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn client_frames_decode_and_unmask_at_every_length_form() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for len in [0usize, 5, 125, 126, 1000, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let wire = client_frame(0x81, &payload, mask);
            // Every strict prefix of the header is incomplete.
            let head = decode_head(&wire, 1 << 20).unwrap().unwrap();
            for cut in 0..head.header_len {
                assert_eq!(decode_head(&wire[..cut], 1 << 20), Ok(None), "cut {cut}");
            }
            assert_eq!(head.opcode, OpCode::Text);
            assert!(head.fin);
            assert_eq!(head.payload_len, len);
            assert_eq!(head.frame_len(), wire.len());
            let mut body = wire[head.header_len..].to_vec();
            unmask(&mut body, head.mask);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn protocol_violations_and_oversized_frames_are_refused_from_the_header() {
        let mask = [1, 2, 3, 4];
        let refused = |wire: &[u8]| decode_head(wire, 1000).unwrap_err().0;
        assert_eq!(refused(&client_frame(0xC1, b"x", mask)), 1002, "rsv1");
        assert_eq!(refused(&client_frame(0x83, b"x", mask)), 1002, "opcode 3");
        assert_eq!(refused(&[0x81, 0x01, b'x']), 1002, "unmasked");
        assert_eq!(
            refused(&client_frame(0x09, b"", mask)),
            1002,
            "fragmented ping"
        );
        assert_eq!(
            refused(&client_frame(0x89, &[0; 126], mask)),
            1002,
            "long ping"
        );
        assert_eq!(refused(&client_frame(0x81, &[b'a'; 1001], mask)), 1009);
        // Refused from the 14-byte header alone, with the 2^62-byte payload nowhere.
        let mut huge = vec![0x82, 0xff];
        huge.extend_from_slice(&(1u64 << 62).to_be_bytes());
        huge.extend_from_slice(&mask);
        assert_eq!(refused(&huge), 1009);
        huge[2] = 0x80;
        assert_eq!(refused(&huge), 1002);
    }

    #[test]
    fn close_payloads_need_a_valid_code_and_utf8_reason() {
        assert_eq!(check_close_payload(b""), Ok(()));
        assert_eq!(check_close_payload(&[0x03]).unwrap_err().0, 1002);
        for code in [1000u16, 1001, 1003, 1007, 1011, 3000, 4999] {
            assert_eq!(check_close_payload(&code.to_be_bytes()), Ok(()), "{code}");
        }
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(
                check_close_payload(&code.to_be_bytes()).unwrap_err().0,
                1002,
                "{code}"
            );
        }
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(b"\xff");
        assert_eq!(check_close_payload(&bad_reason).unwrap_err().0, 1007);
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let f = close_frame(1013, &"é".repeat(100));
        assert!(f.len() <= 2 + 125);
        assert!(std::str::from_utf8(&payload_of(&f)[2..]).is_ok());
    }
}
