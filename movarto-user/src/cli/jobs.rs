//! `movarto-user jobs`: the migrations the agents know, with the RAM copy's figures
//! (`virsh domjobinfo`'s). Unfinished ones by default, every one with `--all`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow};
use clap::Args;
use movarto_user::{
    agent::{AgentClient, token::Token},
    inventory::Inventory,
    jobs,
};

/// The agents to ask, named as `migrate` names them; without them, the inventory's.
#[derive(Args, Debug)]
pub struct AgentFlags {
    /// The source site's agent, e.g. https://203.0.113.1:7878.
    #[arg(long, requires = "source_token_file")]
    pub source: Option<String>,
    #[arg(long)]
    pub source_token_file: Option<PathBuf>,
    /// The destination site's agent.
    #[arg(long, requires = "destination_token_file")]
    pub destination: Option<String>,
    #[arg(long)]
    pub destination_token_file: Option<PathBuf>,
    /// A CA certificate (PEM) the agents' TLS certificates chain to.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
}

impl AgentFlags {
    /// A client of each agent given, the source's first.
    pub fn clients(&self) -> Result<Vec<AgentClient>> {
        let pairs = [
            (&self.source, &self.source_token_file),
            (&self.destination, &self.destination_token_file),
        ];
        let mut clients = Vec::new();
        for (url, token_file) in pairs {
            if let (Some(url), Some(token_file)) = (url, token_file) {
                let token = Token::from_file(token_file)?;
                clients.push(AgentClient::new(
                    url,
                    token.as_str(),
                    self.ca_cert.as_deref(),
                )?);
            }
        }
        Ok(clients)
    }

    /// The agents the flags name, else every site's of the inventory (`--config`, or
    /// /etc/movarto/movarto.toml if it exists).
    pub fn clients_or_inventory(&self, config: Option<&Path>) -> Result<Vec<AgentClient>> {
        let clients = self.clients()?;
        if !clients.is_empty() {
            return Ok(clients);
        }
        let Some(inventory) = Inventory::load_optional(config)? else {
            return Ok(clients);
        };
        inventory
            .sites
            .keys()
            .map(|site| {
                inventory
                    .agent(site)
                    .map_err(|e| anyhow!("site {site}: {e}"))
            })
            .collect()
    }
}

#[derive(Args, Debug)]
pub struct JobsArgs {
    #[command(flatten)]
    pub agents: AgentFlags,
    /// Finished migrations too (completed, rolled back, stopped).
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &JobsArgs, config: Option<&Path>) -> Result<()> {
    let clients = args.agents.clients_or_inventory(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let listing = runtime.block_on(jobs::list(&clients, args.all))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        print!("{}", listing.render());
    }
    Ok(())
}
