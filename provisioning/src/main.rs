//! `edgelora-fleet`: the fleet operator's tool. Creates the fleet CA, enrolls devices (or signs
//! their CSRs), revokes them and keeps the CRL fresh. See README.md beside this crate.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edgelora_fleet::collector::report;
use edgelora_fleet::collector::server::CollectorOptions;
use edgelora_fleet::fleet::{
    DEFAULT_CRL_DAYS, DEFAULT_PORT, DeviceRecord, Fleet, InitOptions, RevocationReason,
};
use edgelora_fleet::pki::DEFAULT_DEVICE_DAYS;
use edgelora_ledger::sync::bundle::write_file_atomic;

#[derive(Parser, Debug)]
#[command(
    name = "edgelora-fleet",
    version,
    about = "The edgelora fleet: CA, device enrollment and revocation, the attribution collector"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a fleet: root CA, collector certificate, empty CRL, update signing key.
    Init {
        /// The fleet directory to create (refused if it already holds a fleet).
        #[arg(long)]
        dir: PathBuf,
        /// The fleet's name (letters, digits, '.', '_', '-'); names the CA.
        #[arg(long, default_value = "edgelora")]
        name: String,
        /// A name the collector is reached by (DNS name or IP address); repeat for several.
        /// The first is what devices connect to. Default: localhost and 127.0.0.1.
        #[arg(long = "collector-host")]
        collector_hosts: Vec<String>,
        /// The collector's TCP port.
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u16,
        /// Lifetime of each CRL; run `edgelora-fleet crl` well within it.
        #[arg(long, default_value_t = DEFAULT_CRL_DAYS)]
        crl_days: u32,
    },
    /// Make a device's keys and certificate and write its bundle directory.
    Enroll {
        #[arg(long)]
        dir: PathBuf,
        /// The device id (letters, digits, '.', '_', '-'; at most 128).
        #[arg(long)]
        device: String,
        /// The bundle directory to write (must not exist, or be empty). Copy it to the device.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = DEFAULT_DEVICE_DAYS)]
        days: u32,
    },
    /// Sign a CSR made by `edgelorad identity csr`; writes the file `edgelorad identity
    /// install` takes.
    SignCsr {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        csr: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = DEFAULT_DEVICE_DAYS)]
        days: u32,
    },
    /// Revoke a device's certificate and re-sign the CRL (the collector picks it up within
    /// seconds and refuses the device's next connection).
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        device: String,
        /// Record the reason as keyCompromise (default: unspecified).
        #[arg(long)]
        key_compromise: bool,
    },
    /// Re-sign the CRL with a fresh next-update time. Run it from cron: once the CRL expires
    /// the collector refuses every device.
    Crl {
        #[arg(long)]
        dir: PathBuf,
        /// Lifetime of the new CRL in days (default: crl_days from fleet.toml).
        #[arg(long)]
        days: Option<u32>,
    },
    /// Run the collector: devices sync their attribution logs to it over mTLS.
    Collect {
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: String,
        /// Storage: default SQLite at <dir>/collector.db; or a postgres:// URL, which several
        /// collector processes may share.
        #[arg(long)]
        db: Option<String>,
    },
    /// Totals per contributor (and kind), per device and per kind, from the collector's store.
    Report {
        #[arg(long)]
        dir: PathBuf,
        /// As for `collect`.
        #[arg(long)]
        db: Option<String>,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// List the enrolled devices.
    Devices {
        #[arg(long)]
        dir: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            dir,
            name,
            collector_hosts,
            port,
            crl_days,
        } => {
            let mut opts = InitOptions {
                name,
                port,
                crl_days,
                ..InitOptions::default()
            };
            if !collector_hosts.is_empty() {
                opts.collector_hosts = collector_hosts;
            }
            let fleet = Fleet::init(&dir, &opts)?;
            eprintln!(
                "created fleet {} in {}: devices will connect to {} (server name {})",
                fleet.config().name,
                dir.display(),
                fleet.collector_addr(),
                fleet.server_name()
            );
            eprintln!(
                "keep ca.key, collector.key and update.key secret; refresh the CRL (valid {} \
                 days) from cron with `edgelora-fleet crl --dir {}`",
                fleet.config().crl_days,
                dir.display()
            );
            Ok(())
        }
        Command::Enroll {
            dir,
            device,
            out,
            days,
        } => {
            let fleet = Fleet::open(&dir)?;
            let rec = fleet.enroll(&device, &out, days)?;
            println!("{}", out.display());
            eprintln!(
                "enrolled {} (serial {}, valid until {}); copy {} to the device, keeping \
                 device.key and ledger.key private",
                rec.device_id,
                rec.serial,
                utc(rec.not_after),
                out.display()
            );
            Ok(())
        }
        Command::SignCsr {
            dir,
            csr,
            out,
            days,
        } => {
            let fleet = Fleet::open(&dir)?;
            let pem = std::fs::read_to_string(&csr)
                .with_context(|| format!("reading {}", csr.display()))?;
            let (rec, issued) = fleet
                .sign_csr(&pem, days)
                .with_context(|| format!("signing {}", csr.display()))?;
            write_file_atomic(&out, issued.to_text().as_bytes(), 0o644)?;
            println!("{}", out.display());
            eprintln!(
                "signed a certificate for {} (serial {}, valid until {}); on the device run \
                 `edgelorad identity install --cert {}`",
                rec.device_id,
                rec.serial,
                utc(rec.not_after),
                out.display()
            );
            Ok(())
        }
        Command::Revoke {
            dir,
            device,
            key_compromise,
        } => {
            let fleet = Fleet::open(&dir)?;
            let was_revoked = fleet.device(&device)?.is_some_and(|r| r.is_revoked());
            let reason = if key_compromise {
                RevocationReason::KeyCompromise
            } else {
                RevocationReason::Unspecified
            };
            let rec = fleet.revoke(&device, reason)?;
            if was_revoked {
                eprintln!("{} was already revoked; re-signed the CRL", rec.device_id);
            } else {
                eprintln!(
                    "revoked {} (serial {}); the collector refuses it from its next connection",
                    rec.device_id, rec.serial
                );
            }
            Ok(())
        }
        Command::Crl { dir, days } => {
            let fleet = Fleet::open(&dir)?;
            let info = fleet.refresh_crl(days)?;
            eprintln!(
                "signed CRL number {} listing {} revoked certificates, valid until {}",
                info.number,
                info.revoked,
                utc(info.next_update.unix_timestamp())
            );
            Ok(())
        }
        Command::Collect { dir, listen, db } => {
            let mut opts = CollectorOptions::new(&dir, listen);
            opts.db = db;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(edgelora_fleet::collector::server::serve(opts))
        }
        Command::Report {
            dir,
            db,
            device,
            json,
        } => {
            let store = report::open_store(&dir, db.as_deref())?;
            let r = store.report(device.as_deref())?;
            if json {
                println!("{}", report::render_json(&r));
            } else {
                print!("{}", report::render_table(&r));
            }
            Ok(())
        }
        Command::Devices { dir, json } => {
            let fleet = Fleet::open(&dir)?;
            let devices = fleet.devices()?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if json {
                let rows: Vec<serde_json::Value> =
                    devices.iter().map(|d| device_json(d, now)).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            if devices.is_empty() {
                eprintln!("no devices enrolled in {}", dir.display());
                return Ok(());
            }
            println!(
                "{:<24} {:<8} {:<6} {:<20} {:<32}",
                "DEVICE", "STATUS", "FLOW", "NOT AFTER", "SERIAL"
            );
            for d in &devices {
                println!(
                    "{:<24} {:<8} {:<6} {:<20} {:<32}",
                    d.device_id,
                    status_word(d, now),
                    flow_word(d),
                    utc(d.not_after),
                    d.serial
                );
            }
            Ok(())
        }
    }
}

fn status_word(d: &DeviceRecord, now: i64) -> &'static str {
    use edgelora_fleet::fleet::DeviceStatus::*;
    match d.status(now) {
        Active => "active",
        Revoked => "revoked",
        Expired => "expired",
        Pending => "pending",
    }
}

fn flow_word(d: &DeviceRecord) -> &'static str {
    match d.flow {
        edgelora_fleet::fleet::EnrollFlow::Enroll => "enroll",
        edgelora_fleet::fleet::EnrollFlow::Csr => "csr",
    }
}

fn device_json(d: &DeviceRecord, now: i64) -> serde_json::Value {
    let mut v = serde_json::to_value(d).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("status".into(), status_word(d, now).into());
    }
    v
}

/// Unix seconds as `YYYY-MM-DD HH:MM UTC`.
fn utc(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => format!("@{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_unix_seconds() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13 UTC");
    }

    #[test]
    fn cli_parses_repeated_collector_hosts() {
        let cli = Cli::try_parse_from([
            "edgelora-fleet",
            "init",
            "--dir",
            "f",
            "--collector-host",
            "a.example",
            "--collector-host",
            "10.0.0.1",
        ])
        .unwrap();
        let Command::Init {
            collector_hosts, ..
        } = cli.command
        else {
            panic!("not init");
        };
        assert_eq!(collector_hosts, vec!["a.example", "10.0.0.1"]);
    }

    #[test]
    fn unknown_subcommand_is_refused() {
        assert!(Cli::try_parse_from(["edgelora-fleet", "frobnicate"]).is_err());
    }
}
