//! What the verbs and the agent do to an attached datapath: the forwarding check before
//! a mode that routes, switching modes, detaching, reading its status.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use movarto_common::{
    config::{Config, Mode},
    flow::{FlowKey, FlowValue},
    net::addr,
};

use super::{CounterSnapshot, Owner, Pinned, detach, forwarding_enabled, ifindex};

/// The datapath's pin name: the one given, or else the uplink's name.
pub fn pin_name_or<'a>(pin_name: Option<&'a str>, uplink: &'a str) -> &'a str {
    pin_name.unwrap_or(uplink)
}

/// Fails if `mode` routes packets of the service `home` through `uplink` and the kernel
/// does not forward that family there.
pub fn require_forwarding(uplink: &str, mode: Mode, home: IpAddr) -> Result<()> {
    let (name, sysctl) = if home.is_ipv6() {
        ("IPv6", "net.ipv6.conf.all.forwarding")
    } else {
        ("IPv4", "net.ipv4.conf.all.forwarding")
    };
    if mode.routes_packets() && !forwarding_enabled(uplink, home.is_ipv6())? {
        bail!(
            "{name} forwarding is off on {uplink}; mode {} routes the packets of {home} \
             through it (sysctl -w {sysctl}=1)",
            mode.name()
        );
    }
    Ok(())
}

/// Switches the mode of `uplink`'s datapath in this network namespace; returns the mode
/// it had (`None` if the map held an unknown one).
pub fn switch_mode(uplink: &str, pin_name: Option<&str>, mode: Mode) -> Result<Option<Mode>> {
    // A deleted uplink is named as such, before anything about its pins.
    ifindex(uplink)?;
    let mut pinned = Pinned::open_for(uplink, pin_name_or(pin_name, uplink))?;
    let config = pinned.config()?;
    let home = addr::from_map(config.home_addr, config.service_family)
        .context("the pinned configuration has no valid home address")?;
    require_forwarding(uplink, mode, home)?;
    let before = config.mode();
    pinned.set_mode(mode)?;
    Ok(before)
}

/// What [`detach_uplink`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detached {
    /// Detached from the uplink.
    Uplink,
    /// Only removed the pins: their uplink no longer exists anywhere (deleted, or its
    /// network namespace was), so nothing was attached.
    OrphanedPins,
}

/// Detaches the datapath of `uplink` in this network namespace, or removes the pins of
/// one whose uplink no longer exists anywhere.
pub fn detach_uplink(uplink: &str, pin_name: Option<&str>) -> Result<Detached> {
    let name = pin_name_or(pin_name, uplink);
    let pinned = Pinned::open(name)?;
    if pinned.uplink_gone()? {
        drop(pinned);
        detach(name)?;
        return Ok(Detached::OrphanedPins);
    }
    // Refuses another namespace's datapath that happens to use the same name.
    pinned.check_owner(uplink)?;
    drop(pinned);
    detach(name)?;
    Ok(Detached::Uplink)
}

/// A datapath's state at one instant, read from its pins, from any namespace; says
/// whose datapath it is. The only write is the derived eviction counters.
pub struct Status {
    pub pinned_at: PathBuf,
    pub owner: Owner,
    /// Whether it is attached to the uplink asked about, in this network namespace.
    pub attached_here: bool,
    /// The one service's configuration, or the uplink's if it serves none or several.
    pub config: Config,
    pub counters: CounterSnapshot,
    /// Every service, in slot order, with its own counters.
    pub services: Vec<(Config, CounterSnapshot)>,
    /// How many services the uplink holds at most.
    pub services_capacity: u32,
    pub flows: Vec<(FlowKey, FlowValue)>,
    /// How many flows the flow map and the pending flows' map hold at most.
    pub flows_capacity: u32,
    pub pending_flows_capacity: u32,
}

impl Status {
    /// The status of the datapath pinned for `uplink` (under `pin_name`, if given).
    pub fn read(uplink: &str, pin_name: Option<&str>) -> Result<Self> {
        let mut pinned = Pinned::open(pin_name_or(pin_name, uplink))?;
        let owner = pinned.owner()?;
        let (flows, counters) = pinned.read_now()?;
        let services = pinned
            .services
            .list()?
            .into_iter()
            .map(|service| Ok((service, pinned.services.counters(service.slot)?)))
            .collect::<Result<Vec<_>>>()?;
        let config = match services.as_slice() {
            [(one, _)] => *one,
            _ => pinned.uplink()?,
        };
        Ok(Self {
            attached_here: owner.is(uplink).unwrap_or(false),
            owner,
            config,
            counters,
            services_capacity: pinned.services.capacity,
            services,
            flows,
            flows_capacity: pinned.flows_capacity,
            pending_flows_capacity: pinned.pending_flows_capacity,
            pinned_at: pinned.dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_uplink_is_named_not_its_sysctl_file() {
        for mode in [Mode::Receive, Mode::Forward] {
            let err =
                require_forwarding("movarto-gone0", mode, "2001:db8::10".parse().expect("ip"))
                    .expect_err("no such interface");
            let text = format!("{err:#}");
            assert!(text.contains("no interface named movarto-gone0"), "{text}");
            assert!(!text.contains("/proc/sys"), "{text}");
        }
        // Modes that route nothing don't need the interface's forwarding.
        require_forwarding(
            "movarto-gone0",
            Mode::Track,
            "192.0.2.10".parse().expect("ip"),
        )
        .expect("track routes nothing");
    }
}
