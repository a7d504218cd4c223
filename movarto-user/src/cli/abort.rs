//! `movarto-user abort`: rolls a migration back before its switchover, as a failure
//! would, and says what was undone; after the switchover it refuses and says why.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use movarto_user::{
    inventory::{Inventory, locate_migration},
    jobs::abort::abort,
};

use super::{jobs::AgentFlags, units::parse_duration};

#[derive(Args, Debug)]
pub struct AbortArgs {
    /// The VM (its migration in progress) or a migration id.
    pub target: String,
    /// --source names the agent that rolls back; --destination is not needed.
    #[command(flatten)]
    pub agents: AgentFlags,
    /// How long to wait for the rollback to finish (a number with a unit: 90s, 2m).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub wait: Duration,
}

pub fn run(args: &AbortArgs, config: Option<&Path>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let source = if args.agents.source.is_some() {
        let clients = args.agents.clients()?;
        clients.into_iter().next().context("no source agent")?
    } else if let Some(inventory) = Inventory::load_optional(config)? {
        // The site whose agent holds the source's half of the target.
        let site = runtime
            .block_on(locate_migration(&inventory, &args.target))
            .map_err(anyhow::Error::msg)?;
        inventory.agent(&site).map_err(anyhow::Error::msg)?
    } else {
        bail!(
            "abort needs the source's agent: --source URL --source-token-file FILE (or an \
             inventory: --config PATH)"
        );
    };
    let source = &source;
    let aborted = runtime.block_on(abort(source, &args.target, args.wait))?;
    let record = &aborted.record;
    println!(
        "migration {} of {} rolled back (aborted in {}): {}",
        record.id(),
        record.spec.vm,
        aborted.from,
        aborted.undone()
    );
    if record.dns_owed.restore_ttl {
        println!(
            "DNS: the TTL's restoration is owed; the `migrate` that follows this migration \
             does it, else `movarto-user migrate --resume {} --source {} --source-token-file \
             FILE --dns-key-file FILE`",
            record.id(),
            source.base()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        abort: AbortArgs,
    }

    #[test]
    fn abort_names_the_source_agent_with_its_token() {
        let args =
            Cli::try_parse_from(["abort", "web", "--source=http://a", "--source-token-file=a"])
                .expect("parses")
                .abort;
        assert_eq!(args.target, "web");
        assert_eq!(args.wait, Duration::from_secs(120));
        let err = Cli::try_parse_from(["abort", "web", "--source=http://a"])
            .err()
            .expect("a URL without its token file is refused");
        assert!(err.to_string().contains("--source-token-file"), "{err}");
        let only_b = Cli::try_parse_from([
            "abort",
            "web",
            "--destination=http://b",
            "--destination-token-file=b",
        ])
        .expect("parses")
        .abort;
        let err = run(&only_b, None).expect_err("no source");
        assert!(err.to_string().contains("--source URL"), "{err}");
        assert!(Cli::try_parse_from(["abort", "web", "--wait=5"]).is_err());
    }
}
