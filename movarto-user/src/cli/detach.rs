//! `movarto-user detach`: removes a datapath's pins, which detaches it.

use anyhow::Result;
use clap::Args;
use movarto_user::datapath::{Detached, detach_uplink, pin_name_or};

#[derive(Args, Debug)]
pub struct DetachArgs {
    pub uplink: String,
    /// The pin name given to `attach --pin-name`.
    #[arg(long, value_name = "NAME")]
    pub pin_name: Option<String>,
}

pub fn run(a: DetachArgs) -> Result<()> {
    let name = pin_name_or(a.pin_name.as_deref(), &a.uplink);
    match detach_uplink(&a.uplink, a.pin_name.as_deref())? {
        Detached::OrphanedPins => println!(
            "removed the pins under {name}: the uplink they were attached to no longer exists \
             (deleted, or its network namespace was), so nothing was attached"
        ),
        Detached::Uplink => println!("detached from {} (pin name {name})", a.uplink),
    }
    Ok(())
}
