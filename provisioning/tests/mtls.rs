//! Mutual TLS between devices and the collector, over real loopback TCP: who gets in, who is
//! refused at the handshake, and the CSR enrolment flow end to end.
//!
//! The server here is a stand-in for the collector: it accepts with the `ServerTls`
//! configuration current at that moment, completes the handshake, writes "ok" and reports what
//! it saw. A refused client never reads that "ok".

// The daemon's `identity` module is compiled in directly (it depends only on crates this one
// has): depending on the daemon crate would build CUDA bindings and tokenizers for a PKI test.
#[allow(dead_code)]
#[path = "../../daemon/src/identity.rs"]
mod identity;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edgelora_fleet::fleet::{EnrollFlow, Fleet, InitOptions, RevocationReason};
use edgelora_fleet::tls::{ServerTls, peer_device_id, peer_ledger_key};
use edgelora_ledger::sync::bundle::{DeviceBundle, IssuedCertificate, crypto_provider};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);

/// What the server saw: the peer's device id and ledger key, or the handshake error.
type Seen = Result<(Option<String>, Option<[u8; 32]>), String>;

struct TestServer {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_server(tls: Arc<ServerTls>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(mut s) => {
                        let certs = s.get_ref().1.peer_certificates().unwrap_or_default();
                        let who = (peer_device_id(certs), peer_ledger_key(certs));
                        let _ = s.write_all(b"ok").await;
                        let _ = s.flush().await;
                        let _ = tx.send(Ok(who));
                        let _ = s.shutdown().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    TestServer { addr, seen, task }
}

/// Connects, handshakes and reads the server's "ok".
async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let mut s = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if &buf != b"ok" {
        return Err(format!("read {buf:?}"));
    }
    Ok(())
}

/// One connection attempt: what the client got and what the server saw.
async fn attempt(
    server: &mut TestServer,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> (Result<(), String>, Seen) {
    let client = tokio::time::timeout(WAIT, connect(server.addr, config, server_name))
        .await
        .expect("the client finished in time");
    let seen = tokio::time::timeout(WAIT, server.seen.recv())
        .await
        .expect("the server reported in time")
        .expect("the server is running");
    (client, seen)
}

async fn attempt_bundle(
    server: &mut TestServer,
    bundle: &DeviceBundle,
) -> (Result<(), String>, Seen) {
    attempt(server, bundle.client_config().unwrap(), &bundle.server_name).await
}

/// Refused at the handshake: the server's handshake failed (with an error mentioning
/// `server_says`) and the client never read data.
fn assert_refused((client, seen): &(Result<(), String>, Seen), server_says: &str) {
    assert!(client.is_err(), "the client read data: {client:?}");
    match seen {
        Err(e) => assert!(
            e.to_lowercase().contains(&server_says.to_lowercase()),
            "server error {e:?} does not mention {server_says:?}"
        ),
        Ok(who) => panic!("the server completed a handshake with {who:?}"),
    }
}

struct Setup {
    tmp: tempfile::TempDir,
    fleet: Fleet,
    tls: Arc<ServerTls>,
    server: TestServer,
}

async fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let fleet = Fleet::init(&tmp.path().join("fleet"), &InitOptions::default()).unwrap();
    let tls = ServerTls::load(fleet.dir()).unwrap();
    let server = start_server(tls.clone()).await;
    Setup {
        tmp,
        fleet,
        tls,
        server,
    }
}

fn enroll(s: &Setup, id: &str) -> DeviceBundle {
    let out = s.tmp.path().join(format!("bundle-{id}"));
    s.fleet.enroll(id, &out, 30).unwrap();
    DeviceBundle::load(&out).unwrap()
}

#[tokio::test]
async fn enrolled_device_connects_and_server_sees_its_device_id_and_ledger_key() {
    let mut s = setup().await;
    let bundle = enroll(&s, "box-1");
    let (client, seen) = attempt_bundle(&mut s.server, &bundle).await;
    client.unwrap();
    let (id, key) = seen.unwrap();
    assert_eq!(id.as_deref(), Some("box-1"));
    let registered = s.fleet.ledger_key("box-1").unwrap().unwrap();
    assert_eq!(key, Some(registered.to_bytes()));
}

#[tokio::test]
async fn handshake_refused_without_a_client_certificate() {
    let mut s = setup().await;
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_file(s.fleet.dir().join("ca.crt")).unwrap();
    roots.add(ca).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"edgelora-sync/1".to_vec()];
    let r = attempt(&mut s.server, Arc::new(config), "localhost").await;
    assert_refused(&r, "no certificates");
}

#[tokio::test]
async fn handshake_refused_for_a_certificate_from_another_fleets_ca() {
    let mut s = setup().await;
    let other = Fleet::init(
        &s.tmp.path().join("other-fleet"),
        &InitOptions {
            name: "other".into(),
            ..InitOptions::default()
        },
    )
    .unwrap();
    let out = s.tmp.path().join("stranger");
    other.enroll("box-1", &out, 30).unwrap();
    let stranger = DeviceBundle::load(&out).unwrap();
    // The stranger trusts the other fleet's CA, so give it ours to get as far as client auth.
    std::fs::copy(s.fleet.dir().join("ca.crt"), out.join("ca.crt")).unwrap();
    let r = attempt_bundle(&mut s.server, &stranger).await;
    assert_refused(&r, "UnknownIssuer");
}

#[tokio::test]
async fn revoked_device_is_refused_once_the_watcher_reloads_the_crl() {
    let mut s = setup().await;
    let bundle = enroll(&s, "box-1");
    let watcher = s.tls.spawn_watcher(Duration::from_millis(100));

    let (client, seen) = attempt_bundle(&mut s.server, &bundle).await;
    client.unwrap();
    assert_eq!(seen.unwrap().0.as_deref(), Some("box-1"));

    let before = s.tls.current();
    s.fleet
        .revoke("box-1", RevocationReason::KeyCompromise)
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while Arc::ptr_eq(&before, &s.tls.current()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watcher did not reload the CRL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = attempt_bundle(&mut s.server, &bundle).await;
    assert_refused(&r, "revoked");
    assert_eq!(s.fleet.ledger_key("box-1").unwrap(), None);

    // Another device is unaffected.
    let other = enroll(&s, "box-2");
    let (client, _) = attempt_bundle(&mut s.server, &other).await;
    client.unwrap();
    watcher.abort();
}

#[tokio::test]
async fn handshake_refused_for_an_expired_certificate() {
    let mut s = setup().await;
    let now = OffsetDateTime::now_utc();
    let out = s.tmp.path().join("expired");
    s.fleet
        .enroll_with_validity(
            "box-old",
            &out,
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .unwrap();
    let bundle = DeviceBundle::load(&out).unwrap();
    let r = attempt_bundle(&mut s.server, &bundle).await;
    assert_refused(&r, "certificate expired");
}

#[tokio::test]
async fn handshake_refused_for_a_server_auth_only_certificate_from_the_fleet_ca() {
    let mut s = setup().await;
    let out = s.tmp.path().join("server-only");
    s.fleet.issue_server_auth_bundle("box-srv", &out).unwrap();
    let bundle = DeviceBundle::load(&out).unwrap();
    let r = attempt_bundle(&mut s.server, &bundle).await;
    assert_refused(
        &r,
        "does not allow extended key usage for client authentication",
    );
    assert_eq!(s.fleet.device("box-srv").unwrap(), None, "not registered");
}

#[tokio::test]
async fn expired_crl_refuses_every_device_until_it_is_refreshed() {
    let mut s = setup().await;
    let bundle = enroll(&s, "box-1");
    let now = OffsetDateTime::now_utc();
    s.fleet
        .write_crl(now - time::Duration::days(2), now - time::Duration::days(1))
        .unwrap();
    assert!(s.tls.reload_if_changed().unwrap());
    assert!(s.tls.crl_next_update().unwrap() < std::time::SystemTime::now());
    let r = attempt_bundle(&mut s.server, &bundle).await;
    assert_refused(&r, "certificate revocation list expired");

    s.fleet.refresh_crl(None).unwrap();
    assert!(s.tls.reload_if_changed().unwrap());
    let (client, _) = attempt_bundle(&mut s.server, &bundle).await;
    client.unwrap();
}

#[tokio::test]
async fn a_bad_new_crl_keeps_the_previous_configuration() {
    let mut s = setup().await;
    let bundle = enroll(&s, "box-1");
    let before = s.tls.current();
    std::fs::write(
        s.fleet.dir().join("crl.pem"),
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .unwrap();
    assert!(s.tls.reload_if_changed().is_err());
    assert!(Arc::ptr_eq(&before, &s.tls.current()));
    // The same bad file is not retried (or re-reported) on every poll.
    assert!(!s.tls.reload_if_changed().unwrap());
    let (client, _) = attempt_bundle(&mut s.server, &bundle).await;
    client.unwrap();

    // A CRL signed by another CA is refused too.
    let other = Fleet::init(&s.tmp.path().join("other"), &InitOptions::default()).unwrap();
    std::fs::copy(other.dir().join("crl.pem"), s.fleet.dir().join("crl.pem")).unwrap();
    let e = s.tls.reload_if_changed().unwrap_err();
    assert!(
        format!("{e:#}").contains("not signed by the fleet CA"),
        "{e:#}"
    );
    assert!(Arc::ptr_eq(&before, &s.tls.current()));
}

#[tokio::test]
async fn csr_flow_end_to_end_connects_with_the_devices_own_keys() {
    let mut s = setup().await;
    let data = s.tmp.path().join("appliance");
    let made = identity::make_csr(&data, "box-csr", None).unwrap();
    let csr = std::fs::read_to_string(&made.path).unwrap();

    let (rec, issued) = s.fleet.sign_csr(&csr, 30).unwrap();
    assert_eq!(rec.flow, EnrollFlow::Csr);
    assert_eq!(rec.ledger_key, made.ledger_key.to_verifier_string());
    let cert_file = s.tmp.path().join("box-csr.cert");
    std::fs::write(&cert_file, issued.to_text()).unwrap();

    let bundle = identity::install(&data, &cert_file, None, None).unwrap();
    assert_eq!(bundle.device_id, "box-csr");
    assert_eq!(bundle.collector, vec!["localhost:7443".to_string()]);
    assert_eq!(
        bundle.ledger_key_path(),
        None,
        "the daemon keeps its own ledger key"
    );
    let reloaded = DeviceBundle::load(&data.join("identity")).unwrap();

    let (client, seen) = attempt_bundle(&mut s.server, &reloaded).await;
    client.unwrap();
    let (id, key) = seen.unwrap();
    assert_eq!(id.as_deref(), Some("box-csr"));
    assert_eq!(key, Some(made.ledger_key.to_bytes()));
    assert_eq!(
        s.fleet.ledger_key("box-csr").unwrap(),
        Some(made.ledger_key)
    );
}

#[tokio::test]
async fn sign_csr_refuses_a_csr_without_the_uri_sans() {
    let s = setup().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "box-bare");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let e = s.fleet.sign_csr(&csr, 30).unwrap_err().to_string();
    assert!(e.contains("urn:edgelora:device:"), "{e}");
    assert_eq!(s.fleet.device("box-bare").unwrap(), None);
}

#[tokio::test]
async fn sign_csr_ignores_requested_ca_and_server_auth_bits() {
    let s = setup().await;
    let data = s.tmp.path().join("appliance");
    let made = identity::make_csr(&data, "box-greedy", None).unwrap();
    // Re-issue the same identity's CSR asking to be a CA with serverAuth.
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(&made.device_key).unwrap()).unwrap();
    let parsed = rcgen::CertificateSigningRequestParams::from_pem(
        &std::fs::read_to_string(&made.path).unwrap(),
    )
    .unwrap();
    let mut params = parsed.params;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();

    let (_, issued) = s.fleet.sign_csr(&csr, 30).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&issued.device_cert).unwrap();
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
}

#[tokio::test]
async fn install_refuses_a_certificate_for_another_devices_tls_key() {
    let s = setup().await;
    let a = s.tmp.path().join("a");
    let made = identity::make_csr(&a, "box-a", None).unwrap();
    let (_, issued) = s
        .fleet
        .sign_csr(&std::fs::read_to_string(&made.path).unwrap(), 30)
        .unwrap();
    let cert_file = s.tmp.path().join("a.cert");
    std::fs::write(&cert_file, issued.to_text()).unwrap();

    // B shares A's ledger key but made its own TLS key.
    let b = s.tmp.path().join("b");
    std::fs::create_dir_all(b.join("ledger")).unwrap();
    std::fs::copy(a.join("ledger/ledger.key"), b.join("ledger/ledger.key")).unwrap();
    identity::make_csr(&b, "box-a", None).unwrap();
    let e = identity::install(&b, &cert_file, None, None).unwrap_err();
    assert!(format!("{e:#}").contains("does not match"), "{e:#}");
    assert!(!b.join("identity/bundle.toml").exists());

    // C has a different ledger key altogether.
    let c = s.tmp.path().join("c");
    identity::make_csr(&c, "box-a", None).unwrap();
    let e = identity::install(&c, &cert_file, None, None).unwrap_err();
    assert!(format!("{e:#}").contains("different ledger key"), "{e:#}");
}

#[tokio::test]
async fn install_refuses_a_certificate_file_with_a_foreign_ca() {
    let s = setup().await;
    let data = s.tmp.path().join("appliance");
    let made = identity::make_csr(&data, "box-x", None).unwrap();
    let (_, mut issued) = s
        .fleet
        .sign_csr(&std::fs::read_to_string(&made.path).unwrap(), 30)
        .unwrap();
    let other = Fleet::init(&s.tmp.path().join("other"), &InitOptions::default()).unwrap();
    issued.ca_cert = CertificateDer::from_pem_file(other.dir().join("ca.crt")).unwrap();
    let cert_file = s.tmp.path().join("x.cert");
    std::fs::write(&cert_file, issued.to_text()).unwrap();
    let e = identity::install(&data, &cert_file, None, None).unwrap_err();
    assert!(
        format!("{e:#}").contains("does not verify against the CA"),
        "{e:#}"
    );
    let _ = IssuedCertificate::read(&cert_file).unwrap();
    assert!(!Path::new(&data.join("identity/bundle.toml")).exists());
}
