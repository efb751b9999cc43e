//! Integrations over the bus: the event contract of every topic ([`events`]) and the bus that
//! carries it ([`bus`]: the in-process bus, the default when no Kafka is configured; [`kafka`]:
//! Apache Kafka).
//!
//! Topics are keyed by `room_id`, so a room's events keep their order; delivery is at least
//! once and every effect is idempotent (see `docs/integrations.md`).

pub mod bus;
pub mod consume;
pub mod events;
pub mod kafka;

pub use bus::{Bus, Consumer, Delivery, InProcessBus, PublishError, Record};
pub use consume::{ConsumeContext, Outcome};
pub use events::{decode, encode, Topics};
pub use kafka::{KafkaBus, KafkaSettings};
