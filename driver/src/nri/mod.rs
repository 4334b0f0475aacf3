//! The NRI side of the driver: the container runtime calls knd over NRI (ttrpc multiplexed over
//! one unix stream) when pod sandboxes and containers are created and removed.
//!
//! NRI has no Rust library, so the wire layers live here: [`mux`] (NRI's connection
//! multiplexing), [`ttrpc`] (framing, a server, a client) and [`plugin`] (registration,
//! configuration, synchronization and events, with reconnection); [`pods`] is what knd does on
//! those events.

pub mod mux;
pub mod plugin;
pub mod pods;
pub mod proto;
pub mod ttrpc;
