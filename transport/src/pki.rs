//! The exchange's small certificate authority.
//!
//! * The CA signs one server certificate for the exchange and one client
//!   certificate per agent.
//! * An agent's identity is its certificate subject: `CN` = agent id,
//!   `OU` = department code. The exchange authorises every stream against it.

use anyhow::{anyhow, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
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
    }
}
