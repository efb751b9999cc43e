//! Fuzzes the envelope parser and the per-code `data` parsers with arbitrary frame bytes.
#![no_main]

use gateway::cmd::{Code, Command};
use gateway::codec::parse_envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = parse_envelope(data) {
        if let Some(code) = Code::parse(&envelope.code) {
            let _ = Command::parse(code, envelope.data, &envelope.user_id);
        }
    }
});
