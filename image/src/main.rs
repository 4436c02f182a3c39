//! `edgelora-image`: builds the flashable appliance image and signed update bundles. See
//! README.md beside this crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use edgelora_image::build::{self, BuildOptions, DataOptions, Sizes};
use edgelora_image::bundle::{self, Bundle, Encoding, PayloadSource};
use edgelora_image::rootfs::{self, Arch, Base, RootfsSpec};

#[derive(Parser, Debug)]
#[command(
    name = "edgelora-image",
    version,
    about = "The edgelora appliance image (A/B root slots, systemd-boot) and signed update bundles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a flashable disk image: ESP + root slots A and B + data partition.
    Build(Box<BuildArgs>),
    /// Build only the root filesystem (a directory, or a .tar), e.g. to make an update bundle.
    Rootfs(Box<RootfsArgs>),
    /// Make a signed update bundle from a root filesystem.
    Bundle(BundleArgs),
    /// Check a bundle's signature and every payload digest; print its manifest.
    Verify {
        bundle: PathBuf,
        /// The fleet's update.pub.
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct RootfsSource {
    /// The base system: debootstrap:<suite> (e.g. debootstrap:bookworm).
    #[arg(long, conflicts_with = "base_tar")]
    base: Option<String>,
    /// A base root filesystem tarball instead (for Jetson: an arm64 rootfs).
    #[arg(long)]
    base_tar: Option<PathBuf>,
    /// Debian mirror for debootstrap.
    #[arg(long, default_value = "http://deb.debian.org/debian")]
    mirror: String,
    /// The edgelorad binary for the target architecture. With --arch aarch64 and no --daemon,
    /// edgelorad is cross-compiled from the workspace (--source).
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// The edgelora workspace to cross-compile edgelorad from (default: the one this binary was
    /// built from).
    #[arg(long, value_name = "DIR")]
    source: Option<PathBuf>,
    /// edgelorad.toml for the box.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The fleet's update.pub (default: update.pub in --bundle, which `edgelora-fleet enroll`
    /// puts there).
    #[arg(long)]
    update_pub: Option<PathBuf>,
    /// The image version (semantic version).
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    version: semver::Version,
    #[arg(long, value_enum, default_value = "x86_64")]
    arch: Arch,
    /// Root on the serial console without a password: for labs and tests only.
    #[arg(long)]
    debug_console: bool,
    /// Seconds a new boot has to answer /health with 200 before it counts as failed.
    #[arg(long, default_value_t = 300)]
    health_timeout: u64,
    /// Extra kernel command line.
    #[arg(long, default_value = rootfs::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Cache for debootstrap bases (default: $EDGELORA_CACHE/image or ~/.cache/edgelora/image).
    #[arg(long)]
    cache: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BuildArgs {
    #[command(flatten)]
    src: RootfsSource,
    /// A root filesystem made by `edgelora-image rootfs` (directory or .tar) instead of building one.
    #[arg(long, conflicts_with_all = ["base", "base_tar"])]
    rootfs: Option<PathBuf>,
    /// The device bundle from `edgelora-fleet enroll` (goes to the data partition's identity/).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// A model (GGUF file, or HF/GPTQ folder) for the data partition; the daemon serves it.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Adapter packs / PEFT folders for the data partition's adapters/.
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// Also keep the root filesystem as this .tar (for update bundles of the same build).
    #[arg(long)]
    rootfs_out: Option<PathBuf>,
    /// Size of each root slot in MiB (default: twice the root filesystem, at least 1024).
    #[arg(long)]
    slot_mib: Option<u64>,
    /// Size of the data partition in MiB before first-boot growth.
    #[arg(long, default_value_t = 512)]
    data_mib: u64,
    /// Size of the EFI system partition in MiB.
    #[arg(long, default_value_t = 256)]
    esp_mib: u64,
    /// The disk image to write (x86_64), or the output folder (aarch64: Jetson hand-off).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct RootfsArgs {
    #[command(flatten)]
    src: RootfsSource,
    /// The model path edgelorad serves (as on the box, e.g. /var/lib/edgelora/models/x.gguf).
    #[arg(long)]
    model_path: Option<String>,
    /// Output: a directory, or a file ending in .tar.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct BundleArgs {
    /// A root filesystem (directory or .tar) made by `edgelora-image rootfs` or `build --rootfs-out`.
    #[arg(long)]
    rootfs: PathBuf,
    /// Must equal the root filesystem's /etc/edgelora/version.
    #[arg(long)]
    version: semver::Version,
    /// The fleet's update.key (from `edgelora-fleet init`).
    #[arg(long)]
    key: PathBuf,
    #[arg(long, value_enum, default_value = "x86_64")]
    arch: Arch,
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Build(a) => cmd_build(*a),
        Command::Rootfs(a) => cmd_rootfs(*a),
        Command::Bundle(a) => cmd_bundle(a),
        Command::Verify { bundle, key, json } => cmd_verify(&bundle, &key, json),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgelora-image: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn default_cache() -> PathBuf {
    if let Some(d) = std::env::var_os("EDGELORA_CACHE") {
        return PathBuf::from(d).join("image");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/edgelora/image")
}

impl RootfsSource {
    fn spec(&self, bundle: Option<&Path>, serve_args: String) -> Result<RootfsSpec> {
        let base = match (&self.base, &self.base_tar) {
            (Some(b), None) => Base::parse(b, &self.mirror)?,
            (None, Some(t)) => Base::Tar(t.clone()),
            _ => {
                bail!("give the base system: --base debootstrap:bookworm or --base-tar ROOTFS.tar")
            }
        };
        let config = self
            .config
            .clone()
            .context("--config edgelorad.toml is needed")?;
        let update_pub = match (&self.update_pub, bundle) {
            (Some(p), _) => p.clone(),
            (None, Some(b)) if b.join("update.pub").is_file() => b.join("update.pub"),
            _ => bail!(
                "the fleet's update key is needed: --update-pub FLEET/update.pub (or a --bundle \
                 from `edgelora-fleet enroll`, which carries it)"
            ),
        };
        let listen = listen_of(&config)?;
        let daemon = match (&self.daemon, self.arch) {
            (Some(d), _) => d.clone(),
            (None, Arch::Aarch64) => {
                // Minutes of compiling: only once the cheap inputs are known to be good.
                edgelora_image::bundle::load_public_key(&update_pub)
                    .with_context(|| format!("the update key {}", update_pub.display()))?;
                let source = match &self.source {
                    Some(s) => s.clone(),
                    None => edgelora_image::cross::default_source().context(
                        "--daemon PATH (an edgelorad built for aarch64) or --source DIR (the \
                         edgelora workspace to cross-compile it from) is needed: the workspace \
                         this binary was built from is gone",
                    )?,
                };
                edgelora_image::cross::build_daemon(&source)?
            }
            (None, Arch::X86_64) => {
                bail!("--daemon PATH (the edgelorad binary) is needed")
            }
        };
        Ok(RootfsSpec {
            base,
            arch: self.arch,
            daemon,
            config,
            update_pub,
            version: self.version.clone(),
            serve_args,
            debug_console: self.debug_console,
            health_timeout: self.health_timeout,
            health_url: format!("http://127.0.0.1:{}/health", listen.port()),
            cmdline: self.cmdline.clone(),
            cache: self.cache.clone().unwrap_or_else(default_cache),
        })
    }
}

/// The daemon's listen address from its config (default as the daemon's).
fn listen_of(config: &Path) -> Result<std::net::SocketAddr> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let t: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", config.display()))?;
    let s = t
        .get("listen")
        .and_then(|v| v.as_str())
        .unwrap_or("127.0.0.1:8080");
    s.parse()
        .with_context(|| format!("{}: listen = {s:?}", config.display()))
}

fn cmd_build(a: BuildArgs) -> Result<()> {
    let start = Instant::now();
    let data = DataOptions {
        model: a.model.clone(),
        adapters: a.adapters.clone(),
        identity: a.bundle.clone(),
    };
    let serve_args = build::serve_args(&data);
    let spec = match &a.rootfs {
        Some(_) => None,
        None => Some(a.src.spec(a.bundle.as_deref(), serve_args)?),
    };
    let opts = BuildOptions {
        spec,
        prebuilt_rootfs: a.rootfs.clone(),
        arch: a.src.arch,
        data,
        rootfs_out: a.rootfs_out.clone(),
        sizes: Sizes {
            slot_mib: a.slot_mib,
            data_mib: a.data_mib,
            esp_mib: a.esp_mib,
        },
        cmdline: a.src.cmdline.clone(),
        out: a.out.clone(),
    };
    let summary = build::build(&opts)?;
    eprintln!("{summary}");
    eprintln!(
        "edgelora-image: done in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_rootfs(a: RootfsArgs) -> Result<()> {
    let serve_args = a
        .model_path
        .as_ref()
        .map(|m| format!(" --model {m}"))
        .unwrap_or_default();
    let spec = a.src.spec(None, serve_args)?;
    let is_tar = a.out.extension().is_some_and(|e| e == "tar");
    if !is_tar {
        rootfs::build(&spec, &a.out)?;
        eprintln!("edgelora-image: root filesystem in {}", a.out.display());
        return Ok(());
    }
    let work = build::work_dir(&a.out)?;
    let dir = work.path().join("rootfs");
    rootfs::build(&spec, &dir)?;
    build::tar_rootfs(&dir, &a.out)?;
    eprintln!("edgelora-image: root filesystem in {}", a.out.display());
    Ok(())
}

fn cmd_bundle(a: BundleArgs) -> Result<()> {
    let key = bundle::load_signing_key(&a.key)?;
    let work = build::work_dir(&a.out)?;
    let root = build::rootfs_dir(&a.rootfs, work.path())?;
    let have = rootfs::version_of(&root)?;
    if have != a.version {
        bail!(
            "--version {} but the root filesystem {} was built as {have}",
            a.version,
            a.rootfs.display()
        );
    }
    // x86_64 boots the kernel and initrd from the ESP, so they travel beside the root image;
    // a Jetson boots them from the slot itself (L4T's launcher reads /boot of APP or APP_b).
    let boot_files = match a.arch {
        Arch::X86_64 => Some(rootfs::kernel_and_initrd(&root)?),
        Arch::Aarch64 => {
            let conf = root.join("boot/extlinux/extlinux.conf");
            if !conf.is_file() {
                bail!(
                    "{}: no boot/extlinux/extlinux.conf: a Jetson bundle is made from the root \
                     filesystem after NVIDIA's apply_binaries.sh (HANDOFF.md, Updates)",
                    a.rootfs.display()
                );
            }
            None
        }
    };
    let img = work.path().join("rootfs.ext4");
    eprintln!("edgelora-image: making the root slot image");
    edgelora_image::disk::ext4_image(&root, "edgelora-root", &img, 0, None)?;
    eprintln!("edgelora-image: signing the bundle");
    let mut sources = vec![PayloadSource {
        name: "rootfs".into(),
        path: img,
        encoding: Encoding::Zstd,
    }];
    if let Some((kernel, initrd)) = boot_files {
        sources.push(PayloadSource {
            name: "kernel".into(),
            path: kernel,
            encoding: Encoding::Raw,
        });
        sources.push(PayloadSource {
            name: "initrd".into(),
            path: initrd,
            encoding: Encoding::Raw,
        });
    }
    let mut last = Instant::now();
    let m = bundle::write_bundle(
        &a.out,
        a.arch.compatible(),
        &a.version,
        &sources,
        &key,
        &mut |d, t| {
            if last.elapsed().as_secs() >= 2 || d == t {
                last = Instant::now();
                eprintln!("  [bundle] {} / {} MiB", d >> 20, t >> 20);
            }
        },
    )?;
    let size = std::fs::metadata(&a.out)?.len();
    println!(
        "{}: edgelora {} for {}, {} payloads, {:.1} MiB, signed by key {}",
        a.out.display(),
        m.version,
        m.compatible,
        m.payloads.len(),
        size as f64 / (1 << 20) as f64,
        m.key_id
    );
    Ok(())
}

fn cmd_verify(path: &Path, key: &Path, json: bool) -> Result<()> {
    let key = bundle::load_public_key(key)?;
    let b = Bundle::open(path, &key)?;
    b.verify_payloads(&mut |_, _| {})?;
    let m = b.manifest();
    if json {
        println!("{}", serde_json::to_string(m)?);
    } else {
        println!(
            "{}: good signature (key {}); edgelora {} for {}",
            path.display(),
            m.key_id,
            m.version,
            m.compatible
        );
        for p in &m.payloads {
            println!(
                "  {:<8} {:>12} B stored ({:?}), {:>12} B, blake3 {}",
                p.name, p.size, p.encoding, p.raw_size, p.raw_blake3
            );
        }
    }
    Ok(())
}
