//! The protocol codec: bytes in, envelopes out; replies in, frame bytes out. No I/O and no
//! tokio here, so it can be property-tested, fuzzed and benchmarked on its own.
//!
//! - [`envelope`]: parses one client text frame into a borrowed [`Envelope`].
//! - [`reply`]: builds server frames (`X_response`, errors, `connected`) as complete WebSocket
//!   frame bytes, serialized once and shareable between recipients.
//! - [`ws`]: the WebSocket frame header for unmasked server frames, and close frames.

pub mod envelope;
pub mod reply;
pub mod ws;

pub use envelope::{parse_envelope, Envelope, EnvelopeError};
pub use reply::{FrameBuilder, Reply};

/// The protocol's `error_code` values (PROTOCOL.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    UnknownCode,
    AuthError,
    Forbidden,
    NotFound,
    NotJoined,
    TooLarge,
    RateLimited,
    Unavailable,
}

impl ErrorCode {
    /// Every code, for metric label pre-registration.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownCode,
        ErrorCode::AuthError,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::NotJoined,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::UnknownCode => "UNKNOWN_CODE",
            ErrorCode::AuthError => "AUTH_ERROR",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::NotJoined => "NOT_JOINED",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }

    /// Position in [`ErrorCode::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A request that cannot be served: the error code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ProtocolError {}
