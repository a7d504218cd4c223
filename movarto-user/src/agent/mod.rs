//! `movarto-user agent`: the per-site daemon. It owns the site's datapath (pinned), its
//! QEMU processes and tap devices, and serves an authenticated HTTP+JSON control API
//! ([`api`]) that the orchestrator (`movarto-user migrate`) calls.

pub mod api;
pub mod blackout;
pub mod client;
pub mod garp;
pub mod metrics;
pub(crate) mod migrations;
pub mod netlink;
mod server;
mod site;
mod snapshot;
pub mod tap;
pub mod token;
mod vms;

use anyhow::Result;

pub use client::{AgentClient, AgentError};
pub use server::{AgentConfig, openapi, serve};

/// Serves the agent until it is stopped, on a runtime of its own.
pub fn run(config: AgentConfig) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(config))
}
