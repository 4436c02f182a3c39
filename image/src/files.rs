//! The files the builder writes into the root filesystem and the ESP: systemd units, mounts,
//! the update layout, boot entries. One place, so the partition names the image's GPT uses,
//! the fstab mounts and `edgelorad update` agree.

/// GPT partition names (`PARTLABEL`s): stable across devices, so one update bundle fits all.
pub const ESP_LABEL: &str = "edgelora-esp";
pub const DATA_LABEL: &str = "edgelora-data";
pub fn root_label(slot: char) -> String {
    format!("edgelora-root-{slot}")
}

/// The uid/gid of the `edgelora` user. Fixed, because the data partition outlives root
/// filesystems: every image version must own its files with the same numbers.
pub const SERVICE_UID: u32 = 900;

/// Where the data partition is mounted (models, adapters, ledger, identity).
pub const DATA_DIR: &str = "/var/lib/edgelora";

/// `/etc/fstab`: the root is mounted read-only by the kernel command line; the state systemd
/// itself keeps lives on tmpfs; the data partition grows to its partition on first boot.
pub fn fstab() -> String {
    format!(
        "# edgelora appliance: the root slot is read-only; state lives on the data partition.\n\
         PARTLABEL={DATA_LABEL} {DATA_DIR} ext4 defaults,noatime,x-systemd.growfs 0 2\n\
         PARTLABEL={ESP_LABEL} /boot/efi vfat umask=0077,noatime 0 2\n\
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
