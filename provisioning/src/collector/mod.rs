//! The collector: accepts devices' sync connections over mTLS, verifies each upload against the
//! device's registered ledger key and the Merkle history it already accepted, stores events
//! exactly once, acknowledges the highest contiguous sequence number stored.

pub mod postgres;
pub mod report;
pub mod server;
pub mod sqlite;
pub mod store;
