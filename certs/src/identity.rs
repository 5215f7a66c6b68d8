//! Identities and roles, carried in a certificate's URI SAN.
//!
//! `gantry://agent/<agent-id>` is an agent, `gantry://admin/<name>` an administrator and
//! `gantry://coordinator` the coordinator. The role comes from the identity, never from
//! anything the peer says on the wire.

use std::fmt;

use gantry_protocol::AgentId;

/// Who is on the other end of a connection, as its certificate proves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Agent(AgentId),
    Admin(String),
    Coordinator,
}

/// What an identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Admin,
    Coordinator,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate could not be parsed: {0}")]
    Unparsable(String),
    #[error("certificate carries no gantry:// URI SAN, so it names no Gantry identity")]
    Missing,
    #[error("certificate carries more than one gantry:// URI SAN")]
    Ambiguous,
    #[error("unknown identity URI {0:?}: expected gantry://agent/<id>, gantry://admin/<name> or gantry://coordinator")]
    Unknown(String),
}

const SCHEME: &str = "gantry://";

impl Identity {
    pub fn role(&self) -> Role {
        match self {
            Self::Agent(_) => Role::Agent,
            Self::Admin(_) => Role::Admin,
            Self::Coordinator => Role::Coordinator,
        }
    }

    pub fn uri(&self) -> String {
        match self {
            Self::Agent(id) => format!("{SCHEME}agent/{id}"),
            Self::Admin(name) => format!("{SCHEME}admin/{name}"),
            Self::Coordinator => format!("{SCHEME}coordinator"),
        }
    }

    /// Parses an identity URI.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let unknown = || IdentityError::Unknown(uri.chars().take(120).collect());
        let rest = uri.strip_prefix(SCHEME).ok_or_else(unknown)?;
        if rest == "coordinator" {
            return Ok(Self::Coordinator);
        }
        if let Some(id) = rest.strip_prefix("agent/") {
            return AgentId::parse(id).map(Self::Agent).map_err(|_| unknown());
        }
        if let Some(name) = rest.strip_prefix("admin/") {
            if valid_admin_name(name) {
                return Ok(Self::Admin(name.to_owned()));
            }
        }
        Err(unknown())
    }

    /// Reads the identity from a DER certificate's URI SANs.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let mut found = None;
        for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if uri.starts_with(SCHEME) {
                    if found.is_some() {
                        return Err(IdentityError::Ambiguous);
                    }
                    found = Some(Self::from_uri(uri)?);
                }
            }
        }
        found.ok_or(IdentityError::Missing)
    }
}

/// Admin names: 1 to 64 of `[a-z0-9._-]`, so they are safe in URIs, paths and logs.
pub fn valid_admin_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip() {
        let agent = Identity::Agent(AgentId::parse("ag-0123456789ab").expect("id"));
        for id in [agent, Identity::Admin("ops".into()), Identity::Coordinator] {
            assert_eq!(Identity::from_uri(&id.uri()).as_ref(), Ok(&id));
        }
        for bad in [
            "gantry://agent/x",
            "gantry://admin/",
            "gantry://admin/A B",
            "https://x",
            "gantry://root",
        ] {
            assert!(
                matches!(Identity::from_uri(bad), Err(IdentityError::Unknown(_))),
                "{bad}"
            );
        }
    }
}
