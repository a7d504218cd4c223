//! `movarto-user mode`: switches the datapath's mode (one map write; no reload).

use anyhow::Result;
use clap::Args;
use movarto_common::config::Mode;
use movarto_user::datapath::switch_mode;

#[derive(Args, Debug)]
pub struct ModeArgs {
    pub uplink: String,
    #[arg(value_enum)]
    pub mode: Mode,
    #[arg(long, value_name = "NAME")]
    pub pin_name: Option<String>,
}

pub fn run(a: ModeArgs) -> Result<()> {
    let before = switch_mode(&a.uplink, a.pin_name.as_deref(), a.mode)?;
    println!(
        "{}: mode {} -> {}",
        a.uplink,
        before.map_or("unknown", Mode::name),
        a.mode.name()
    );
    Ok(())
}
