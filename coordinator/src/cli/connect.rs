//! The CLI's way to the coordinator: the admin context, then one connection.

use gantry_protocol::{AdminRequest, AdminResponse};

use crate::cli::client::AdminClient;
use crate::cli::context::{context_path, AdminContext};
use crate::cli::failure::{usage, Failure};

/// Connects with the admin context.
pub async fn connect() -> Result<AdminClient, Failure> {
    let path = context_path().map_err(usage)?;
    let ctx = AdminContext::load(&path).map_err(usage)?;
    Ok(AdminClient::connect(&ctx).await?)
}

/// Connects with the admin context and sends one request.
pub async fn admin(req: AdminRequest) -> Result<AdminResponse, Failure> {
    let mut client = connect().await?;
    let resp = client.request(&req).await;
    client.close().await;
    Ok(resp?)
}
