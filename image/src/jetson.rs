//! aarch64 / Jetson: NVIDIA's flashing tools (Linux_for_Tegra) own the partition layout, the
//! bootloader and the kernel, so the build hands them a root filesystem, a data partition image
//! and the partition entries to add, with the exact steps in HANDOFF.md.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Result;

use crate::build::{BuildOptions, tar_rootfs};
use crate::disk::{self, MIB};
use crate::files;

/// The partition NVIDIA's flash configuration needs in addition to APP / APP_b.
fn partition_xml(data_bytes: u64) -> String {
    format!(
        "<!-- Add inside the <device type=\"external\"> (NVMe) or <device type=\"sdmmc_user\"> block of\n     \
         the flash configuration, after APP_b. Its name is the GPT PARTLABEL the image mounts. -->\n\
         <partition name=\"{}\" type=\"data\">\n    \
         <allocation_policy> sequential </allocation_policy>\n    \
         <filesystem_type> basic </filesystem_type>\n    \
         <size> {data_bytes} </size>\n    \
         <file_system_attribute> 0 </file_system_attribute>\n    \
         <allocation_attribute> 0x808 </allocation_attribute>\n    \
         <percent_reserved> 0 </percent_reserved>\n    \
         <filename> edgelora-data.ext4 </filename>\n\
         </partition>\n",
        files::DATA_LABEL
    )
}

fn handoff_text(version: &semver::Version) -> String {
    format!(
        "# edgelora {version} for Jetson (aarch64): hand-off to NVIDIA's flashing tools\n\n\
         Files: `rootfs.tar` (the appliance root filesystem), `edgelora-data.ext4` (models,\n\
         adapters, identity), `edgelora-partitions.xml` (the data partition entry).\n\n\
         On the flashing host, in an unpacked Jetson Linux BSP (`Linux_for_Tegra/`):\n\n\
         ```sh\n\
         sudo tar -xpf rootfs.tar --numeric-owner -C Linux_for_Tegra/rootfs\n\
         cd Linux_for_Tegra && sudo ./apply_binaries.sh        # NVIDIA kernel, modules, firmware\n\
         cp ../edgelora-data.ext4 tools/kernel_flash/images/   # or beside the flash XML\n\
         # add edgelora-partitions.xml's <partition> after APP_b in the flash XML, e.g.\n\
         #   tools/kernel_flash/flash_l4t_t234_nvme.xml (Orin, NVMe)\n\
         sudo ROOTFS_AB=1 ./tools/kernel_flash/l4t_initrd_flash.sh --external-device nvme0n1p1 \\\n  \
           -c tools/kernel_flash/flash_l4t_t234_nvme.xml --showlogs --network usb0 \\\n  \
           jetson-orin-nano-devkit external\n\
         ```\n\n\
         `ROOTFS_AB=1` gives the APP and APP_b root slots; the bootloader's own retry counter\n\
         (nvbootctrl) falls back to the other slot after failed boots. Package configuration\n\
         of an arm64 base cannot run on an x86-64 build host: bring a configured arm64 root\n\
         filesystem with `--base-tar` (NVIDIA's sample rootfs, or debootstrap run on arm64).\n"
    )
}

/// Writes rootfs.tar, edgelora-data.ext4, edgelora-partitions.xml and HANDOFF.md into `o.out`.
pub fn handoff(
    o: &BuildOptions,
    root: &Path,
    data_dir: &Path,
    version: &semver::Version,
) -> Result<String> {
    let out = &o.out;
    fs::create_dir_all(out)?;
    eprintln!("edgelora-image: root filesystem tarball for Linux_for_Tegra/rootfs");
    tar_rootfs(root, &out.join("rootfs.tar"))?;
    eprintln!("edgelora-image: data partition");
    let data_bytes = disk::ext4_image(
        data_dir,
        files::DATA_LABEL,
        &out.join("edgelora-data.ext4"),
        o.sizes.data_mib * MIB,
        Some(files::SERVICE_UID),
    )?;
    fs::write(
        out.join("edgelora-partitions.xml"),
        partition_xml(data_bytes),
    )?;
    fs::write(out.join("HANDOFF.md"), handoff_text(version))?;
    let mut s = String::new();
    writeln!(
        s,
        "{}: edgelora {version} for Jetson (aarch64)",
        out.display()
    )?;
    writeln!(
        s,
        "  rootfs.tar, edgelora-data.ext4 ({} MiB), edgelora-partitions.xml",
        data_bytes / MIB
    )?;
    write!(s, "  next: follow {}", out.join("HANDOFF.md").display())?;
    Ok(s)
}
