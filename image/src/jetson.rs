//! aarch64 / Jetson: NVIDIA's flashing tools (Linux_for_Tegra) own the partition layout, the
//! bootloader and the kernel, so the build hands them a root filesystem, a data partition image
//! and the partition entry to add, with the exact steps in HANDOFF.md (which says what each
//! step is verified against, and what is not).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Result;

use crate::build::{BuildOptions, tar_rootfs};
use crate::disk::{self, MIB};
use crate::files;

/// The Jetson Linux release the hand-off is written for.
pub const L4T_RELEASE: &str =
    "Jetson Linux r36 (JetPack 6.x; written against the r36.3/r36.4 documentation)";
/// NVIDIA's external-NVMe flash configuration with the rootfs A/B layout (APP id 1, APP_b id 2),
/// as shipped in `Linux_for_Tegra/tools/kernel_flash/` (named in NVIDIA's
/// `l4t_generate_ota_package.sh`: `T234_NVME_ROOTFS_AB_CFG`).
pub const NVME_AB_XML: &str = "tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml";
/// The QSPI (boot firmware) configuration passed through `-p` for Orin.
pub const QSPI_XML: &str = "bootloader/generic/cfg/flash_t234_qspi.xml";

/// The partition to add to NVIDIA's flash configuration, after APP_b.
pub fn partition_xml(data_bytes: u64) -> String {
    format!(
        "<!-- edgelora data partition: add inside the <device type=\"external\"> block of\n     \
         {NVME_AB_XML}, after the <partition name=\"APP_b\"> element and\n     \
         before <partition name=\"secondary_gpt\">. Its name is the GPT PARTLABEL the appliance\n     \
         mounts on /var/lib/edgelora. No id attribute: give it one (above the highest id in that\n     \
         device block) if your flash tools ask for it. -->\n\
         <partition name=\"{}\" type=\"data\">\n    \
         <allocation_policy> sequential </allocation_policy>\n    \
         <filesystem_type> basic </filesystem_type>\n    \
         <size> {data_bytes} </size>\n    \
         <file_system_attribute> 0 </file_system_attribute>\n    \
         <allocation_attribute> 0x8 </allocation_attribute>\n    \
         <align_boundary> 16384 </align_boundary>\n    \
         <percent_reserved> 0 </percent_reserved>\n    \
         <filename> edgelora-data.ext4 </filename>\n    \
         <description> edgelora: models, adapters, ledger, device identity; kept across updates. </description>\n\
         </partition>\n",
        files::DATA_LABEL
    )
}

/// HANDOFF.md: the exact steps, what each one is verified against, and what is not.
pub fn handoff_text(version: &semver::Version, data_mib: u64) -> String {
    format!(
        r#"# edgelora {version} for Jetson (aarch64): hand-off to NVIDIA's flashing tools

Target: {L4T_RELEASE}; Orin modules (t234) booting from an NVMe drive, flashed with rootfs A/B
(`ROOTFS_AB=1`: root slots `APP` = slot A = nvbootctrl slot 0, `APP_b` = slot B = slot 1).
Other carriers or boot media use other board names and flash configurations; the steps stay
the same.

Files here:

- `rootfs.tar`: the appliance root filesystem (your arm64 base + edgelorad, its config, units,
  `/etc/edgelora/update.toml` naming APP/APP_b, the fleet's update key). It has no NVIDIA
  kernel, modules or firmware yet: `apply_binaries.sh` adds them.
- `edgelora-data.ext4`: the data partition ({data_mib} MiB or more: models, adapters,
  identity), GPT name `{data}`, mounted on `/var/lib/edgelora`.
- `edgelora-partitions.xml`: its `<partition>` entry for the flash configuration.

## 1. Unpack the BSP and the root filesystem

Use the base the BSP expects: NVIDIA's sample root filesystem of the same release
(`Tegra_Linux_Sample-Root-Filesystem_R36.x.y_aarch64.tbz2`, Ubuntu 22.04), passed to
`edgelora-image build --base-tar`. Then, on an x86-64 Ubuntu 22.04 host:

```sh
tar -xpf Jetson_Linux_R36.x.y_aarch64.tbz2                  # creates Linux_for_Tegra/
sudo tar -xpf rootfs.tar --numeric-owner -C Linux_for_Tegra/rootfs
cd Linux_for_Tegra
sudo ./tools/l4t_flash_prerequisites.sh                     # host packages for flashing
sudo ./apply_binaries.sh                                    # NVIDIA kernel, modules, firmware, nvbootctrl
sudo ./tools/l4t_create_default_user.sh -u admin -p 'CHANGE-ME' --accept-license   # no oem-config on a headless box
```

`apply_binaries.sh` installs NVIDIA's packages into `rootfs/` (package configuration runs
there, under the host's user-mode emulation, not on this build machine). It also installs
`nv-l4t-bootloader-config.service`, which confirms every boot to the firmware with
`nvbootctrl verify`; the image carries a drop-in
(`/etc/systemd/system/{nvunit}.d/50-edgelora-health-gate.conf`) that holds it back until
`edgelora-boot-ok.service` has seen `/health` answer 200, and skips it when that fails.

## 2. Add the data partition to the flash configuration

```sh
cp {xml} {xml}.orig
# paste edgelora-partitions.xml's <partition> into {xml}:
# inside <device type="external" ...>, after <partition name="APP_b" ...>...</partition>,
# before <partition name="secondary_gpt" ...>
cp ../edgelora-data.ext4 bootloader/
```

Not verified here: the directory the initrd flash resolves an external partition's
`<filename>` against (flash.sh works from `bootloader/`); check the flash log names
`edgelora-data.ext4`, else put the file beside the XML. `allocation_attribute` `0x8` is what
NVIDIA's fixed-size partitions carry: the partition gets `<size>` bytes, and the file system
grows to the partition on first boot (`x-systemd.growfs`), so you may enlarge `<size>`. A
community layer (meta-mender-tegra) reports that `0x808` on the partition just before
`secondary_gpt` makes it take the rest of the drive; not verified here.

## 3. Flash (Orin Nano / Orin NX devkit carrier, NVMe; device in recovery mode)

```sh
sudo ROOTFS_AB=1 ROOTFS_RETRY_COUNT_MAX=3 ./tools/kernel_flash/l4t_initrd_flash.sh     --external-device nvme0n1p1     -c {xml}     -p "-c {qspi}"     --showlogs --network usb0     jetson-orin-nano-devkit internal
```

This is NVIDIA's r36 Quick Start NVMe command (`-c tools/kernel_flash/flash_l4t_t234_nvme.xml`)
with the A/B configuration and `ROOTFS_AB=1`; `ROOTFS_RETRY_COUNT_MAX=3` is the default,
spelled out. AGX Orin devkit: board `jetson-agx-orin-devkit`; check its NVMe command in the
Quick Start of your release.

## 4. After the first boot

- The firmware boots `APP`; `nvbootctrl -t rootfs dump-slots-info` shows both slots `normal`.
- `edgelorad.service` serves; `edgelora-boot-ok.service` waits for `/health` 200 (up to
  `--health-timeout` seconds), then runs `edgelorad update mark-good`, which confirms the boot
  with `nvbootctrl -t rootfs mark-boot-successful`. Not healthy in time: the unit fails, the
  box reboots, the firmware counts a failed boot; after ROOTFS_RETRY_COUNT_MAX it boots the
  other slot.

## Updates

A Jetson update bundle holds one ext4 image of the *complete* root filesystem, NVIDIA's parts
included, so make it from a root filesystem that went through step 1:

```sh
edgelora-image rootfs --arch aarch64 --base-tar Tegra_Linux_Sample-Root-Filesystem_R36.x.y_aarch64.tbz2     --config edgelorad.toml --update-pub fleet/update.pub --version 1.1.0 --out rootfs-1.1.0.tar
# unpack into a fresh Linux_for_Tegra/rootfs, apply_binaries.sh, l4t_create_default_user.sh, then:
sudo edgelora-image bundle --arch aarch64 --rootfs Linux_for_Tegra/rootfs --version 1.1.0     --key fleet/update.key --out edgelora-1.1.0.bundle
# on the box
sudo edgelorad update apply edgelora-1.1.0.bundle && sudo reboot
```

`apply` verifies the signature, the version (no downgrade without `--force`) and every digest,
makes the running slot the next boot, writes the other slot (APP or APP_b), syncs and reads it
back, sets `root=PARTUUID=<that slot>` in the slot's `/boot/extlinux/extlinux.conf` (L4T's
launcher hands that `APPEND` line to the kernel as is), and only then runs
`nvbootctrl -t rootfs set-active-boot-slot <0|1>`. The image must fit the smaller of APP/APP_b.

## Not verified on hardware

Everything above comes from NVIDIA's documentation, NVIDIA's scripts and firmware source, and
field reports; none of it ran on a Jetson here. In particular:

- `nvbootctrl -t rootfs mark-boot-successful` on r36: used by field OTA clients on r36, but one
  report says the command was dropped from nvbootctrl in r35.2.1 (NVIDIA's own unit uses
  `nvbootctrl verify`). If it is missing, `mark-good` exits 3 after a healthy start, the unit
  counts that as success, and NVIDIA's unit (held until then) confirms the boot instead.
- Whether `set-active-boot-slot` also switches the bootloader chain (reports say it does).
- Whether anything resets a board whose boot is not confirmed within a few minutes: keep
  `--health-timeout` short enough for your model to load well within it.
"#,
        data = files::DATA_LABEL,
        nvunit = files::NV_BOOTLOADER_CONFIG_UNIT,
        xml = NVME_AB_XML,
        qspi = QSPI_XML,
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
    fs::write(
        out.join("HANDOFF.md"),
        handoff_text(version, data_bytes / MIB),
    )?;
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
