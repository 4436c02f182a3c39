//! The on-disk format: segment headers, frames, interned events, snapshots. See README.md.

pub mod frame;
pub mod header;
pub mod snapshot;
pub mod wire;
