//! Certificates of the fleet's private PKI, built with rcgen: the root CA, the collector's
//! server certificate, device client certificates, CSR parsing and CRLs. Pure functions over
//! keys and parameters; the fleet directory (`crate::fleet`) decides what to store where.
//!
//! Every key is ECDSA P-256. Device certificates carry the device id and its ledger public key
//! as URI subject alternative names (see `edgelora_ledger::sync::bundle`), so the collector can
//! tie a TLS peer to the key that signs its ledger checkpoints.

use std::net::IpAddr;

use edgelora_ledger::sync::bundle::{self, check_device_id};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;

/// How long the fleet root CA is valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// How long the collector's server certificate is valid.
pub const COLLECTOR_VALIDITY_DAYS: i64 = 825;
/// Default validity of a device certificate.
pub const DEFAULT_DEVICE_DAYS: u32 = 365;
/// Device certificates start this long before their issue time, to tolerate clock skew.
pub const BACKDATE: Duration = Duration::minutes(1);

/// What went wrong building, signing or reading a certificate.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("device id: {0}")]
    DeviceId(#[from] bundle::BundleError),
    /// A collector host that is neither a DNS name nor an IP address.
    #[error("collector host {0:?} is not a DNS name or an IP address")]
    BadHost(String),
    /// A CSR that cannot be signed as a device certificate.
    #[error("certificate signing request: {0}")]
    Csr(String),
    /// A certificate or CRL that does not parse.
    #[error("{what}: {why}")]
    Parse { what: &'static str, why: String },
}

/// The extended key usage a leaf certificate is issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafUsage {
    /// TLS client authentication: every real device certificate.
    ClientAuth,
    /// TLS server authentication only: the collector's certificate; as a device certificate
    /// it exists only to prove the collector refuses it.
    ServerAuth,
}

/// A fresh ECDSA P-256 key.
pub fn generate_key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// A random 16-byte serial number, positive and without a leading zero byte (so its hex form
/// is exactly what a parser reads back).
pub fn random_serial() -> Result<[u8; 16], PkiError> {
    let mut s = [0u8; 16];
    getrandom::fill(&mut s).map_err(|e| PkiError::Random(e.to_string()))?;
    s[0] = (s[0] & 0x7f).max(1);
    Ok(s)
}

/// Lower-case hex, as serials are stored in device records.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// The fleet root CA: CN "<name> fleet root CA", a CA that may sign end-entity certificates
/// only (path length 0), key usage keyCertSign + cRLSign, valid from `now` for 10 years.
pub fn ca_params(fleet_name: &str, now: OffsetDateTime) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = common_name(&format!("{fleet_name} fleet root CA"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = now - BACKDATE;
    p.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    p.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    p.key_identifier_method = KeyIdMethod::Sha256;
    Ok(p)
}

/// The collector's server certificate: SANs = `hosts` (IP addresses as IP SANs, the rest as
/// DNS names), EKU serverAuth only.
pub fn collector_params(
    fleet_name: &str,
    hosts: &[String],
    now: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = common_name(&format!("{fleet_name} collector"));
    p.subject_alt_names = hosts
        .iter()
        .map(|h| host_san(h))
        .collect::<Result<_, _>>()?;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = now - BACKDATE;
    p.not_after = now + Duration::days(COLLECTOR_VALIDITY_DAYS);
    p.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// A collector host as a subject alternative name; also the check `fleet init` applies.
pub fn host_san(host: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !dns_ok {
        return Err(PkiError::BadHost(host.to_string()));
    }
    Ok(SanType::DnsName(
        host.try_into()
            .map_err(|_| PkiError::BadHost(host.to_string()))?,
    ))
}

/// A device certificate: CN = device id, URI SANs for the device id and the ledger key, not a
/// CA, key usage digitalSignature, the given EKU, the given validity window and serial.
/// Built fresh from these arguments alone: nothing a device asked for is copied in.
pub fn device_params(
    device_id: &str,
    ledger_key: &[u8; 32],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    serial: &[u8; 16],
    usage: LeafUsage,
) -> Result<CertificateParams, PkiError> {
    check_device_id(device_id)?;
    let uri = |s: String| -> Result<SanType, PkiError> { Ok(SanType::URI(s.try_into()?)) };
    let mut p = CertificateParams::default();
    p.distinguished_name = common_name(device_id);
    p.subject_alt_names = vec![
        uri(bundle::device_uri(device_id))?,
        uri(bundle::ledger_key_uri(ledger_key))?,
    ];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![match usage {
        LeafUsage::ClientAuth => ExtendedKeyUsagePurpose::ClientAuth,
        LeafUsage::ServerAuth => ExtendedKeyUsagePurpose::ServerAuth,
    }];
    p.not_before = not_before;
    p.not_after = not_after;
    p.serial_number = Some(SerialNumber::from_slice(serial));
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// The identity a device asked for in its CSR, and the key it proved it holds.
#[derive(Debug)]
pub struct CsrIdentity {
    pub device_id: String,
    pub ledger_key: [u8; 32],
    /// The CSR's public key (the signature over the CSR was verified with it).
    pub public_key: rcgen::PublicKey,
}

/// Parses a PEM CSR, verifies its self-signature, and extracts the device id and ledger key
/// from its URI SANs. Refuses a CSR without exactly one of each, or whose CN (if any) differs
/// from the device id. Everything else the CSR asks for (EKU, CA bits, other names) is ignored:
/// the caller builds the certificate from `device_params`.
pub fn read_device_csr(pem: &str) -> Result<CsrIdentity, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        PkiError::Csr(format!(
            "not a valid PEM certificate signing request, or its signature does not verify \
             ({e}); make it with `edgelorad identity csr`"
        ))
    })?;
    let mut device_ids = Vec::new();
    let mut ledger_keys = Vec::new();
    for san in &csr.params.subject_alt_names {
        let SanType::URI(uri) = san else { continue };
        let uri = uri.as_str();
        if uri.starts_with(bundle::DEVICE_URI_PREFIX) {
            let id = bundle::parse_device_uri(uri).ok_or_else(|| {
                PkiError::Csr(format!(
                    "{uri:?}: the device id must be 1-128 letters, digits, '.', '_' or '-'"
                ))
            })?;
            device_ids.push(id.to_string());
        } else if uri.starts_with(bundle::LEDGER_KEY_URI_PREFIX) {
            let key = bundle::parse_ledger_key_uri(uri).ok_or_else(|| {
                PkiError::Csr(format!(
                    "{uri:?}: the ledger key must be 32 bytes, base64url without padding"
                ))
            })?;
            ledger_keys.push(key);
        }
    }
    let device_id = match device_ids.as_slice() {
        [id] => id.clone(),
        [] => {
            return Err(PkiError::Csr(format!(
                "no {}<id> URI subject alternative name; make the CSR with `edgelorad identity csr`",
                bundle::DEVICE_URI_PREFIX
            )));
        }
        _ => return Err(PkiError::Csr("more than one device URI".into())),
    };
    let ledger_key = match ledger_keys.as_slice() {
        [k] => *k,
        [] => {
            return Err(PkiError::Csr(format!(
                "no {}<key> URI subject alternative name; make the CSR with `edgelorad identity csr`",
                bundle::LEDGER_KEY_URI_PREFIX
            )));
        }
        _ => return Err(PkiError::Csr("more than one ledger-key URI".into())),
    };
    // The key must be a real Ed25519 point, or the collector could never verify checkpoints.
    edgelora_ledger::PublicKey::new(&device_id, ledger_key)
        .map_err(|e| PkiError::Csr(format!("ledger key: {e}")))?;
    if let Some(cn) = csr.params.distinguished_name.get(&DnType::CommonName) {
        let cn = match cn {
            rcgen::DnValue::Utf8String(s) => s.clone(),
            rcgen::DnValue::PrintableString(s) => s.as_str().to_string(),
            rcgen::DnValue::Ia5String(s) => s.as_str().to_string(),
            other => format!("{other:?}"),
        };
        if cn != device_id {
            return Err(PkiError::Csr(format!(
                "common name {cn:?} differs from the device URI's id {device_id:?}"
            )));
        }
    }
    Ok(CsrIdentity {
        device_id,
        ledger_key,
        public_key: csr.public_key,
    })
}

/// CRL parameters: `revoked` serials, valid `this_update` .. `next_update`, numbered `number`.
pub fn crl_params(
    revoked: Vec<RevokedCertParams>,
    this_update: OffsetDateTime,
    next_update: OffsetDateTime,
    number: u64,
) -> CertificateRevocationListParams {
    CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    }
}

/// What the fleet records about an issued certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The serial, lower-case hex.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// Serial and validity of a DER certificate.
pub fn cert_summary(der: &[u8]) -> Result<CertSummary, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse {
        what: "certificate",
        why: e.to_string(),
    })?;
    Ok(CertSummary {
        serial: hex(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Every URI subject alternative name of a DER certificate (empty if it does not parse).
pub fn cert_uris(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// The device id a DER certificate names in its device URI.
pub fn cert_device_id(der: &[u8]) -> Option<String> {
    cert_uris(der)
        .iter()
        .find_map(|u| bundle::parse_device_uri(u).map(str::to_string))
}

/// The ledger key a DER certificate names in its ledger-key URI.
pub fn cert_ledger_key(der: &[u8]) -> Option<[u8; 32]> {
    cert_uris(der)
        .iter()
        .find_map(|u| bundle::parse_ledger_key_uri(u))
}

/// The CRL number and next-update time (unix seconds) of a DER CRL.
pub fn crl_summary(der: &[u8]) -> Result<(Option<u64>, Option<i64>), PkiError> {
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| PkiError::Parse {
        what: "CRL",
        why: e.to_string(),
    })?;
    let number = crl.crl_number().and_then(|n| {
        let b = n.to_bytes_be();
        (b.len() <= 8).then(|| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
    });
    Ok((number, crl.next_update().map(|t| t.timestamp())))
}

/// Unix seconds as a time, clamped to what X.509 can say.
pub fn from_unix(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_without_leading_zero() {
        for _ in 0..64 {
            let s = random_serial().unwrap();
            assert!(s[0] >= 1 && s[0] <= 0x7f);
        }
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(),
            vec![0, 1, 0xab, 0xff]
        );
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn hosts_become_ip_or_dns_sans() {
        assert!(matches!(
            host_san("127.0.0.1").unwrap(),
            SanType::IpAddress(_)
        ));
        assert!(matches!(host_san("::1").unwrap(), SanType::IpAddress(_)));
        assert!(matches!(
            host_san("collector.example").unwrap(),
            SanType::DnsName(_)
        ));
        assert!(host_san("bad host").is_err());
        assert!(host_san("").is_err());
        assert!(host_san("-x.example").is_err());
    }

    #[test]
    fn device_certificate_names_device_and_ledger_key() {
        let ca_key = generate_key().unwrap();
        let ca = ca_params("t", OffsetDateTime::now_utc()).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = generate_key().unwrap();
        let now = OffsetDateTime::now_utc();
        let p = device_params(
            "box-1",
            &[9u8; 32],
            now,
            now + Duration::days(1),
            &random_serial().unwrap(),
            LeafUsage::ClientAuth,
        )
        .unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        assert_eq!(cert_device_id(cert.der()).as_deref(), Some("box-1"));
        assert_eq!(cert_ledger_key(cert.der()), Some([9u8; 32]));
        let s = cert_summary(cert.der()).unwrap();
        assert_eq!(s.serial.len(), 32);
    }

    #[test]
    fn device_params_refuse_a_bad_device_id() {
        let now = OffsetDateTime::now_utc();
        let e =
            device_params("a b", &[0; 32], now, now, &[1; 16], LeafUsage::ClientAuth).unwrap_err();
        assert!(e.to_string().contains("a b"), "{e}");
    }
}
