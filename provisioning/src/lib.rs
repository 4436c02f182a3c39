//! edgelora-fleet: the fleet's certificate authority, device enrollment and revocation, and the
//! collector that receives devices' attribution logs over mutual TLS.

pub mod collector;
pub mod fleet;
pub mod pki;
pub mod tls;
