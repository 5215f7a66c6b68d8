//! The admin CLI's context: which coordinator it talks to and with which credentials.
//!
//! `GANTRY_CONFIG`, else `$XDG_CONFIG_HOME/gantry/context.toml`, else
//! `~/.config/gantry/context.toml`: the coordinator address, and beside it `ca.pem` and
//! `admin.pem` (certificate and key, 0600). Written by `gantry init` and `gantry admin
//! add`; read by every command that talks to the coordinator.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminContext {
    /// `host:port` of the coordinator.
    pub address: String,
    /// Paths relative to the context file's directory unless absolute.
    pub ca: String,
    pub credentials: String,
}

/// Where the admin context lives.
pub fn context_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("GANTRY_CONFIG") {
        return Ok(PathBuf::from(p));
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(x).join("gantry").join("context.toml"));
    }
    let home = std::env::var_os("HOME").context(
        "neither GANTRY_CONFIG, XDG_CONFIG_HOME nor HOME is set: cannot find the admin context",
    )?;
    Ok(PathBuf::from(home)
        .join(".config")
        .join("gantry")
        .join("context.toml"))
}

/// A loaded admin context: address plus the PEM texts it points at.
#[derive(Debug)]
pub struct LoadedContext {
    pub address: String,
    pub ca_pem: String,
    pub credentials_pem: String,
}

impl AdminContext {
    /// The context file alone, without the files it names.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read the admin context {}: run `gantry init` on the coordinator, or set GANTRY_CONFIG", path.display())
        })?;
        toml::from_str(&text).with_context(|| format!("invalid admin context {}", path.display()))
    }

    pub fn load(path: &Path) -> anyhow::Result<LoadedContext> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read the admin context {}: run `gantry init` on the coordinator, or set GANTRY_CONFIG", path.display())
        })?;
        let ctx: Self = toml::from_str(&text)
            .with_context(|| format!("invalid admin context {}", path.display()))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let read = |p: &str| {
            let full = base.join(p);
            std::fs::read_to_string(&full).with_context(|| {
                format!(
                    "cannot read {} (named in {})",
                    full.display(),
                    path.display()
                )
            })
        };
        Ok(LoadedContext {
            address: ctx.address.clone(),
            ca_pem: read(&ctx.ca)?,
            credentials_pem: read(&ctx.credentials)?,
        })
    }
}
