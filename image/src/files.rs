//! The files the builder writes into the root filesystem and the ESP: systemd units, mounts,
//! the update layout, boot entries. One place, so the partition names the image's GPT uses,
//! the fstab mounts and `edgelorad update` agree.
//!
//! Two boards: x86_64 (UEFI + systemd-boot: an ESP, slots `edgelora-root-a/b`, boot counting in
//! the entry names) and Jetson (L4T r36 flashed with `ROOTFS_AB=1`: no ESP of ours, slots
//! NVIDIA's `APP` / `APP_b`, boot counting in the firmware, driven with `nvbootctrl`).

/// GPT partition names (`PARTLABEL`s): stable across devices, so one update bundle fits all.
pub const ESP_LABEL: &str = "edgelora-esp";
pub const DATA_LABEL: &str = "edgelora-data";
pub fn root_label(slot: char) -> String {
    format!("edgelora-root-{slot}")
}

/// The rootfs A/B partitions NVIDIA's flash configuration creates with `ROOTFS_AB=1`.
pub const JETSON_ROOT_A: &str = "APP";
pub const JETSON_ROOT_B: &str = "APP_b";
/// Where `nvbootctrl` lives on L4T (package nvidia-l4t-tools).
pub const NVBOOTCTRL: &str = "/usr/sbin/nvbootctrl";
/// NVIDIA's unit that confirms every boot to the firmware (`nvbootctrl verify`).
pub const NV_BOOTLOADER_CONFIG_UNIT: &str = "nv-l4t-bootloader-config.service";

/// The uid/gid of the `edgelora` user. Fixed, because the data partition outlives root
/// filesystems: every image version must own its files with the same numbers.
pub const SERVICE_UID: u32 = 900;

/// Where the data partition is mounted (models, adapters, ledger, identity).
pub const DATA_DIR: &str = "/var/lib/edgelora";

/// `/etc/fstab`: the root is mounted by the kernel command line (read-only on x86_64); the
/// state systemd itself keeps lives on tmpfs; the data partition, found by its GPT name, grows
/// to its partition on first boot. The ESP only where the image has one (`with_esp`: x86_64;
/// on Jetson NVIDIA's flash layout owns the boot partitions, and a mount of a partition that is
/// not there would stop the boot in emergency mode).
pub fn fstab(with_esp: bool) -> String {
    let esp = if with_esp {
        format!("PARTLABEL={ESP_LABEL} /boot/efi vfat umask=0077,noatime 0 2\n")
    } else {
        String::new()
    };
    format!(
        "# edgelora appliance: the root slot is replaced by updates; state lives on the data partition.\n\
         PARTLABEL={DATA_LABEL} {DATA_DIR} ext4 defaults,noatime,x-systemd.growfs 0 2\n\
         {esp}\
         tmpfs /tmp tmpfs mode=1777,nosuid,nodev 0 0\n\
         tmpfs /var/tmp tmpfs mode=1777,nosuid,nodev 0 0\n\
         tmpfs /var/log tmpfs mode=0755 0 0\n\
         tmpfs /var/lib/systemd tmpfs mode=0755 0 0\n"
    )
}

/// First boot: systemd-repart grows the data partition (the last one) to the end of the disk;
/// `x-systemd.growfs` in fstab then grows its file system.
pub fn repart_data() -> String {
    "[Partition]\n\
     # The data partition (edgelora-data) grows to fill the disk on first boot.\n\
     Type=linux-generic\n\
     Label=edgelora-data\n"
        .to_string()
}

/// systemd-networkd: DHCP on every wired interface.
pub fn network() -> &'static str {
    "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
}

/// The daemon's unit: its own user, a read-only view of the system, the systemd watchdog (the
/// daemon pets it only while its engine steps), restart on failure.
pub fn daemon_unit(extra_args: &str) -> String {
    format!(
        "[Unit]\n\
         Description=edgelora appliance daemon (OpenAI-compatible LoRA serving)\n\
         Documentation=https://github.com/edgelora/edgelora\n\
         Wants=network-online.target\n\
         After=network-online.target var-lib-edgelora.mount\n\
         RequiresMountsFor={DATA_DIR}\n\
         StartLimitIntervalSec=300\n\
         StartLimitBurst=10\n\
         \n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         ExecStart=/usr/bin/edgelorad serve --config /etc/edgelora/edgelorad.toml --data-dir {DATA_DIR}{extra_args}\n\
         User=edgelora\n\
         Group=edgelora\n\
         StateDirectory=edgelora\n\
         StateDirectoryMode=0750\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         WatchdogSec=30\n\
         TimeoutStartSec=600\n\
         TimeoutStopSec=45\n\
         LimitMEMLOCK=infinity\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         ProtectKernelTunables=yes\n\
         ProtectKernelModules=yes\n\
         ProtectControlGroups=yes\n\
         RestrictSUIDSGID=yes\n\
         LockPersonality=yes\n\
         ReadWritePaths={DATA_DIR}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// Marks the booted slot good once the daemon answers /health with 200; if it does not within
/// the timeout the boot counts as failed and the box reboots (systemd-boot's counter goes down;
/// at zero the other slot boots).
pub fn boot_ok_unit(health_url: &str, timeout_secs: u64) -> String {
    format!(
        "[Unit]\n\
         Description=edgelora: mark this boot slot good once the daemon is healthy\n\
         After=edgelorad.service boot-efi.mount\n\
         Wants=edgelorad.service\n\
         RequiresMountsFor=/boot/efi\n\
         Before=boot-complete.target\n\
         FailureAction=reboot\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart=/usr/bin/edgelorad update mark-good --health-url {health_url} --timeout {timeout_secs}\n\
         TimeoutStartSec={}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n\
         RequiredBy=boot-complete.target\n",
        timeout_secs + 60
    )
}

/// Jetson: marks the running boot good once the daemon answers /health with 200
/// (`edgelorad update mark-good` → `nvbootctrl -t rootfs mark-boot-successful`). If it does not
/// within the timeout the unit fails and the box reboots; the firmware counts that boot as
/// failed and, after ROOTFS_RETRY_COUNT_MAX of them, boots the other slot. Exit status 3 means
/// healthy but nvbootctrl refused: not a failed boot (NVIDIA's own confirmation still runs).
pub fn boot_ok_unit_jetson(health_url: &str, timeout_secs: u64) -> String {
    format!(
        "[Unit]\n\
         Description=edgelora: confirm this boot to the Jetson firmware once the daemon is healthy\n\
         After=edgelorad.service\n\
         Wants=edgelorad.service\n\
         FailureAction=reboot\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart=/usr/bin/edgelorad update mark-good --health-url {health_url} --timeout {timeout_secs}\n\
         SuccessExitStatus=3\n\
         TimeoutStartSec={}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        timeout_secs + 60
    )
}

/// Jetson: NVIDIA's `nv-l4t-bootloader-config.service` confirms every boot early
/// (`nvbootctrl verify`), which would make a boot count as good before the daemon is healthy.
/// This drop-in makes it wait for the health gate and not run at all when the gate fails.
pub fn nv_bootloader_config_dropin() -> &'static str {
    "# edgelora: NVIDIA's boot confirmation waits for the daemon's health check.\n\
     [Unit]\n\
     After=edgelora-boot-ok.service\n\
     Requires=edgelora-boot-ok.service\n"
}

/// Root on the serial console without a password, for labs and tests only (`--debug-console`).
pub fn autologin_dropin() -> &'static str {
    "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear %I 115200 linux\n"
}

/// `/etc/edgelora/update.toml`: what `edgelorad update` needs to find slots and the ESP.
pub fn update_layout(compatible: &str, cmdline: &str) -> String {
    format!(
        "# Written by edgelora-image: where `edgelorad update` finds the slots and the ESP.\n\
         compatible = \"{compatible}\"\n\
         public_key = \"/etc/edgelora/update.pub\"\n\
         version_file = \"/etc/edgelora/version\"\n\
         esp = \"/boot/efi\"\n\
         cmdline_file = \"/proc/cmdline\"\n\
         kernel_cmdline = {}\n\
         tries = 3\n\
         \n\
         [slots]\n\
         a = \"/dev/disk/by-partlabel/{}\"\n\
         b = \"/dev/disk/by-partlabel/{}\"\n",
        toml::Value::String(cmdline.to_string()),
        root_label('a'),
        root_label('b')
    )
}

/// Jetson's `/etc/edgelora/update.toml`: slots are NVIDIA's rootfs A/B partitions, the boot is
/// switched and confirmed with `nvbootctrl`, and the trial state lives on the data partition.
pub fn update_layout_jetson(compatible: &str) -> String {
    format!(
        "# Written by edgelora-image: Jetson (L4T r36, ROOTFS_AB=1); nvbootctrl switches slots.\n\
         compatible = \"{compatible}\"\n\
         public_key = \"/etc/edgelora/update.pub\"\n\
         version_file = \"/etc/edgelora/version\"\n\
         boot = \"jetson\"\n\
         \n\
         [jetson]\n\
         nvbootctrl = \"{NVBOOTCTRL}\"\n\
         state_file = \"{DATA_DIR}/update-state.json\"\n\
         set_extlinux_root = true\n\
         \n\
         [slots]\n\
         a = \"/dev/disk/by-partlabel/{JETSON_ROOT_A}\"\n\
         b = \"/dev/disk/by-partlabel/{JETSON_ROOT_B}\"\n"
    )
}

/// systemd-boot's settings: no menu delay, no command line editing.
pub fn loader_conf() -> &'static str {
    "timeout 0\neditor no\nauto-entries no\nauto-firmware no\n"
}

/// A Boot Loader Specification entry for one slot: the builder's first entry and every entry
/// `edgelorad update apply` writes. `generation` orders it (systemd-boot boots the highest
/// `version` among entries with the same sort key first).
pub fn boot_entry(slot: char, version: &str, generation: u64, cmdline: &str) -> String {
    let cmdline = cmdline.trim();
    format!(
        "title edgelora {version} (slot {slot})\n\
         sort-key edgelora\n\
         version {generation}\n\
         linux /edgelora/{slot}/vmlinuz\n\
         initrd /edgelora/{slot}/initrd.img\n\
         options root=PARTLABEL={} edgelora.slot={slot} edgelora.version={version}{}{cmdline}\n",
        root_label(slot),
        if cmdline.is_empty() { "" } else { " " }
    )
}
