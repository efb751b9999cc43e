//! Each shard's live connections and the sweep that looks after them: heartbeat pings, the
//! heartbeat timeout, token expiry and the close on shutdown. One timer per shard, instead of
//! two timers and a shutdown watch in every connection's task, keeps an idle connection small.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::auth::{now_secs, Claims};
use crate::codec::ws::{self, OpCode};
use crate::codec::{ErrorCode, FrameBuilder, ProtocolError};
use crate::metrics::{Metrics, OutCode};
use crate::outbox::{clock_ms, FrameClass, Outbox};
use crate::server::Shared;
use crate::shard::ConnId;

/// What the sweep needs of a connection.
pub struct LiveConn {
    pub outbox: Arc<Outbox>,
    /// The session's claims (none on the conformance echo route, which never expires).
    pub claims: Option<Arc<Claims>>,
}

/// The connections running on one shard's thread.
#[derive(Default)]
pub struct Registry {
    // Locked by that shard's thread only (registration, removal, sweep), so never contended.
    conns: Mutex<HashMap<ConnId, LiveConn>>,
}

impl Registry {
    pub fn insert(&self, id: ConnId, conn: LiveConn) {
        self.lock().insert(id, conn);
    }

    pub fn remove(&self, id: ConnId) {
        let mut conns = self.lock();
        conns.remove(&id);
        // Give memory back after a wave of disconnects.
        if conns.capacity() > 64 && conns.len() < conns.capacity() / 4 {
            conns.shrink_to_fit();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, LiveConn>> {
        self.conns.lock().expect("registry lock poisoned")
    }

    /// Closes every connection with 1001 (after what is queued to it).
    pub fn close_all(&self, metrics: &Metrics) {
        for conn in self.lock().values() {
            close(metrics, &conn.outbox, 1001, "server shutting down");
        }
    }
}

/// Records the close code and asks the connection to close after what is queued.
pub fn close(metrics: &Metrics, outbox: &Outbox, code: u16, reason: &str) {
    if outbox.closing().is_none() {
        metrics.close(code);
        outbox.close(code, reason);
    }
}

/// Queues an error frame for the connection and counts it.
pub fn send_error(
    metrics: &Metrics,
    outbox: &Outbox,
    code: &str,
    user_id: Option<&str>,
    room_id: Option<&str>,
    reference: Option<&str>,
    error: &ProtocolError,
) {
    metrics.error(error.code);
    metrics.frames_out(OutCode::Error, u64::from(code == "error"));
    let frame = FrameBuilder::error(code, user_id, room_id, reference, error);
    outbox.push(frame, FrameClass::Durable);
}

/// Runs on the shard's runtime for the life of the shard: every tick (the heartbeat interval,
/// at most a second) closes connections whose token expired (`AUTH_ERROR`, then 1008) or that
/// sent nothing for three heartbeats (1001), and pings every connection once per heartbeat;
/// when the server starts shutting down, closes every connection with 1001.
pub async fn sweep(shared: Arc<Shared>, shard: usize) {
    let heartbeat = Duration::from_millis(shared.config.heartbeat_ms.max(10));
    let timeout_ms = 3 * heartbeat.as_millis() as u64;
    let tick = heartbeat.min(Duration::from_secs(1));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = shared.shutdown_signal();
    let registry = &shared.shards[shard].live;
    let metrics = &shared.metrics;
    let ping = ws::frame(OpCode::Ping, b"");
    let mut next_ping = tokio::time::Instant::now() + heartbeat;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    registry.close_all(metrics);
                    // New connections see the flag when they register and close themselves.
                    return;
                }
                continue;
            }
        }
        let now_ms = clock_ms();
        let now_s = now_secs();
        let pinging = tokio::time::Instant::now() >= next_ping;
        if pinging {
            next_ping += heartbeat;
        }
        for conn in registry.lock().values() {
            if conn.outbox.closing().is_some() {
                continue;
            }
            if let Some(claims) = conn.claims.as_deref().filter(|c| c.exp <= now_s) {
                let error = ProtocolError::new(ErrorCode::AuthError, "token expired");
                send_error(
                    metrics,
                    &conn.outbox,
                    "error",
                    Some(&claims.sub),
                    None,
                    None,
                    &error,
                );
                close(metrics, &conn.outbox, 1008, "token expired");
            } else if now_ms.saturating_sub(conn.outbox.last_seen_ms()) >= timeout_ms {
                close(metrics, &conn.outbox, 1001, "heartbeat timeout");
            } else if pinging {
                conn.outbox.push(ping.clone(), FrameClass::Ephemeral);
            }
        }
    }
}
