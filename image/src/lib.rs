//! edgelora-image: the flashable appliance image (`build`) and signed A/B update bundles
//! (`bundle`, `verify`). The bundle format is also what `edgelorad update apply` reads.

pub mod build;
pub mod bundle;
pub mod cross;
pub mod disk;
pub mod files;
pub mod jetson;
pub mod rootfs;
pub mod tools;
