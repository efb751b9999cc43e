//! Integration workers: they read the gateway's outbound topics and talk to the outside world,
//! and turn what the outside world sends back into `inbound.messages` and `delivery.status`
//! (`docs/integrations.md`).
//!
//! - [`sms`]: Twilio, for SMS and WhatsApp (one Messages API), with its webhooks.
//! - [`email`]: SMTP out (threaded replies), an inbound-parse webhook in.
//! - [`push`]: Firebase Cloud Messaging (HTTP v1).
//!
//! Each runs as its own binary over Kafka, or inside the gateway on the in-process bus.

pub mod email;
pub mod push;
pub mod runtime;
pub mod sms;

pub use runtime::{Ledger, Worker, WorkerMetrics};
