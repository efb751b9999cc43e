//! Integrations over the bus: the event contract of every topic ([`events`]) and the bus that
//! carries it ([`bus`]: the in-process bus, the default when no Kafka is configured).
//!
//! Topics are keyed by `room_id`, so a room's events keep their order; delivery is at least
//! once and every effect is idempotent (see `docs/integrations.md`).

pub mod bus;
pub mod events;

pub use bus::{Bus, Consumer, InProcessBus, PublishError, Record};
pub use events::{decode, encode, Topics};
