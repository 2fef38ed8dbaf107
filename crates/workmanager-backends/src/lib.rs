//! Backends for the core's `StateStore` (and, later, bus) traits. One module
//! per backend; the binary picks one from `StateStore:Type`.

pub mod embedded;

pub use embedded::EmbeddedStore;
