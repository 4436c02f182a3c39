//! Sync: shipping the log to the fleet's collector exactly once over mutual TLS.
//!
//! - `proto`: the wire protocol (version 1, framed postcard over TLS 1.3), documented there.
//! - `check`: what the collector verifies about an upload (pure; no I/O).
//! - `client`: the device's background sync task.
//! - `bundle`: a device's identity bundle (certificate, keys, CA, collector address) and the
//!   client TLS configuration made from it.

pub mod bundle;
pub mod check;
pub mod client;
pub mod proto;
