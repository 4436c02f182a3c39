//! Opt-in DNS-SD advertisement on the LAN (`serve --mdns`): the appliance appears as
//! `<instance>._edgelora._tcp.local.` with TXT records naming the base model, how many adapters it
//! serves and whether an API key is required, so apps can find it without configuration.

use anyhow::{Context, Result};
use mdns_sd::{ServiceDaemon, ServiceInfo};

pub const SERVICE_TYPE: &str = "_edgelora._tcp.local.";

/// Keeps the advertisement alive; dropping it withdraws the service.
pub struct Advert {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Advert {
    pub fn fullname(&self) -> &str {
        &self.fullname
    }
}

impl Drop for Advert {
    fn drop(&mut self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(1));
        }
        let _ = self.daemon.shutdown();
    }
}

/// This machine's host name, for the instance and host records.
fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .unwrap_or_else(|| "edgelora".into())
}

/// Advertises the server listening on `port`.
pub fn advertise(port: u16, base_model: &str, adapters: usize, auth: bool) -> Result<Advert> {
    let daemon = ServiceDaemon::new().context("starting the mDNS responder")?;
    let host = host_name();
    let instance = format!("{host}-{port}");
    let adapters = adapters.to_string();
    let props = [
        ("model", base_model),
        ("adapters", adapters.as_str()),
        ("auth", if auth { "required" } else { "none" }),
        ("api", "openai"),
    ];
    let info = ServiceInfo::new(
        SERVICE_TYPE,
        &instance,
        &format!("{host}.local."),
        "",
        port,
        &props[..],
    )
    .context("building the DNS-SD record")?
    .enable_addr_auto();
    let fullname = info.get_fullname().to_string();
    daemon
        .register(info)
        .context("registering the DNS-SD service")?;
    Ok(Advert { daemon, fullname })
}
