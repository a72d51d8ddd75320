//! The exchange's small certificate authority.
//!
//! * The CA signs one server certificate for the exchange and one client
//!   certificate per agent.
//! * An agent's identity is its certificate subject: `CN` = agent id,
//!   `OU` = department code. The exchange authorises every stream against it.

use anyhow::{anyhow, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

/// Certificate and private key, PEM.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

const ORG: &str = "Ferry";
const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 825;

fn params(days: i64) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let now = OffsetDateTime::now_utc();
    // Tolerate an hour of clock skew between the exchange and the agents.
    // Backdated two days: department servers' clocks drift, and an agent whose
    // clock is hours behind must still accept a certificate issued today.
    p.not_before = now - Duration::days(2);
    p.not_after = now + Duration::days(days);
    Ok(p)
}

/// Creates a self-signed CA.
pub fn create_ca(common_name: &str) -> Result<PemPair> {
    let mut p = params(CA_DAYS)?;
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.distinguished_name.push(DnType::OrganizationName, ORG);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn issuer(ca: &PemPair) -> Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::from_pem(&ca.key_pem).context("reading the CA key")?;
    Issuer::from_ca_cert_pem(&ca.cert_pem, key).context("reading the CA certificate")
}

/// Issues the exchange's server certificate for the given DNS names / IP addresses.
pub fn issue_server(ca: &PemPair, names: &[String]) -> Result<PemPair> {
    let mut p = params(LEAF_DAYS)?;
    p.subject_alt_names = CertificateParams::new(names.to_vec())
        .context("server names")?
        .subject_alt_names;
    p.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("ferry-exchange", String::as_str),
    );
    p.distinguished_name.push(DnType::OrganizationName, ORG);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer(ca)?)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues an agent's client certificate: `CN` = agent id, `OU` = department.
pub fn issue_agent(ca: &PemPair, agent_id: &str, department: &str) -> Result<PemPair> {
    let mut p = params(LEAF_DAYS)?;
    p.distinguished_name.push(DnType::CommonName, agent_id);
    p.distinguished_name
        .push(DnType::OrganizationalUnitName, department);
    p.distinguished_name.push(DnType::OrganizationName, ORG);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer(ca)?)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The identity carried by an agent certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub agent_id: String,
    pub department: String,
    pub not_after_unix: i64,
    /// The certificate's serial number, hex (what a revocation names).
    pub serial: String,
}

/// Why a certificate was revoked (RFC 5280 reason codes, as the CRL carries them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Unspecified,
    KeyCompromise,
    Superseded,
    CessationOfOperation,
}

impl Reason {
    pub fn parse(s: &str) -> Option<Reason> {
        Some(match s {
            "unspecified" => Reason::Unspecified,
            "key-compromise" => Reason::KeyCompromise,
            "superseded" => Reason::Superseded,
            "cessation-of-operation" => Reason::CessationOfOperation,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unspecified => "unspecified",
            Reason::KeyCompromise => "key-compromise",
            Reason::Superseded => "superseded",
            Reason::CessationOfOperation => "cessation-of-operation",
        }
    }

    fn rcgen(self) -> RevocationReason {
        match self {
            Reason::Unspecified => RevocationReason::Unspecified,
            Reason::KeyCompromise => RevocationReason::KeyCompromise,
            Reason::Superseded => RevocationReason::Superseded,
            Reason::CessationOfOperation => RevocationReason::CessationOfOperation,
        }
    }
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Serial number, hex.
    pub serial: String,
    pub revoked_unix: i64,
    pub reason: Reason,
}

/// A certificate revocation list signed by the CA, listing `revoked`; PEM. `number`
/// must grow from one list to the next. Valid for ten years: the exchange is its
/// only reader and replaces it whenever the list changes.
pub fn crl(ca: &PemPair, revoked: &[Revocation], number: u64) -> Result<String> {
    let now = OffsetDateTime::now_utc();
    let revoked_certs = revoked
        .iter()
        .map(|r| {
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(
                    &hex::decode(&r.serial)
                        .with_context(|| format!("serial {:?} is not hex", r.serial))?,
                ),
                revocation_time: OffsetDateTime::from_unix_timestamp(r.revoked_unix).unwrap_or(now),
                reason_code: Some(r.reason.rcgen()),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let params = CertificateRevocationListParams {
        this_update: now - Duration::days(2),
        next_update: now + Duration::days(CA_DAYS),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer(ca)?)?.pem()?)
}

/// Reads agent id and department from a certificate's subject.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<CertIdentity> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| anyhow!("unparsable certificate: {e}"))?;
    let subject = x.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_owned)
    };
    let agent_id = first(&mut subject.iter_common_name())
        .ok_or_else(|| anyhow!("certificate subject has no CN (agent id)"))?;
    let department = first(&mut subject.iter_organizational_unit()).unwrap_or_default();
    Ok(CertIdentity {
        agent_id,
        department,
        not_after_unix: x.validity().not_after.timestamp(),
        serial: hex::encode(x.raw_serial()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn agent_identity_round_trips() {
        let ca = create_ca("test CA").unwrap();
        let agent = issue_agent(&ca, "hp-mz-01", "210102-MZ").unwrap();
        let der = CertificateDer::from_pem_slice(agent.cert_pem.as_bytes()).unwrap();
        let id = identity_of(&der).unwrap();
        assert_eq!(id.agent_id, "hp-mz-01");
        assert_eq!(id.department, "210102-MZ");
        assert!(id.not_after_unix > OffsetDateTime::now_utc().unix_timestamp());
        assert!(!id.serial.is_empty());
        let other = issue_agent(&ca, "hp-mz-01", "210102-MZ").unwrap();
        let other = CertificateDer::from_pem_slice(other.cert_pem.as_bytes()).unwrap();
        assert_ne!(identity_of(&other).unwrap().serial, id.serial);
    }

    #[test]
    fn a_crl_lists_what_it_revokes() {
        use x509_parser::prelude::FromDer;
        let ca = create_ca("test CA").unwrap();
        let agent = issue_agent(&ca, "hp-mz-01", "210102-MZ").unwrap();
        let der = CertificateDer::from_pem_slice(agent.cert_pem.as_bytes()).unwrap();
        let serial = identity_of(&der).unwrap().serial;
        let pem = crl(
            &ca,
            &[Revocation {
                serial: serial.clone(),
                revoked_unix: 1_700_000_000,
                reason: Reason::KeyCompromise,
            }],
            7,
        )
        .unwrap();
        let der =
            rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, list) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
                .unwrap();
        let serials: Vec<String> = list
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect();
        assert_eq!(serials, vec![serial]);
        assert!(crl(&ca, &[], 8).is_ok());
    }
}
