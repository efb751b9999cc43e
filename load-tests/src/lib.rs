//! `loadgen`: many real WebSocket clients speaking the coded JSON protocol against a gateway.
//!
//! # Layout
//!
//! - [`client`]: the upgrade, masked client frames, and a receive path that decodes only frame
//!   headers and finds `seq`/timestamps with a byte search, allocating nothing per frame.
//! - [`stats`]: counters and HdrHistogram latencies shared by one run's connections.
//! - [`report`]: the human table and the JSON report, server RSS and metric scrapes.
//! - [`scenario`]: fanout, connections, churn, history and mixed.
//!
//! Latency is measured from the *intended* send time of an open-loop schedule, so a stalled
//! server shows up as latency instead of silently lowering the offered load.

pub mod client;
pub mod report;
pub mod scenario;
pub mod stats;
