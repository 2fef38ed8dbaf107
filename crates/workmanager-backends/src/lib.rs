//! Backends for the core's `StateStore` and `Bus` traits. One module per
//! backend; the binary picks them from `StateStore:Type` and `PubSub:Type`.

#[cfg(test)]
mod bus_suite;
pub mod dapr;
#[cfg(feature = "testing")]
pub mod dapr_fake;
pub mod embedded;
pub mod embedded_bus;
pub mod nats_bus;
pub mod outbox;
mod readers;
pub mod redis_bus;
mod redis_conn;
pub mod redis_store;
#[cfg(test)]
mod store_suite;
#[cfg(feature = "testing")]
pub mod testing;

pub use dapr::{DaprBus, DaprClient, DaprSettings, DaprStore};
pub use embedded::EmbeddedStore;
pub use embedded_bus::EmbeddedBus;
pub use nats_bus::{NatsAuth, NatsBus, NatsBusSettings};
pub use outbox::FileOutbox;
pub use redis_bus::{RedisBus, RedisBusSettings};
pub use redis_store::{RedisStore, RedisTls};
