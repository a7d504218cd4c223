//! A site in the namespace tests: `ip` commands that must work, MACs as text, the
//! datapath attached with a guard that detaches it, and pass-through XDP for the veth
//! ends that must deliver what XDP on their peer transmits. The pieces the tunnel
//! benchmark shares (the triangle topology) live in movarto-lab; these wrappers fail
//! the test instead of returning errors.

use movarto_lab::netns::Netns;
pub use movarto_lab::triangle::{Attached, Triangle, mac};
use movarto_user::datapath::{Datapath, SiteConfig};

/// Runs `ip args` in `ns`; the test fails if it does.
pub fn sh(ns: &Netns, args: &[&str]) {
    ns.ip(args)
        .unwrap_or_else(|e| panic!("ip {args:?} in {}: {e:#}", ns.name()));
}

/// Attaches the datapath in `ns` to `uplink` (XDP) and `vm_iface` (TC), pinned under
/// the uplink's name; the test fails if it can't.
pub fn attach_in(ns: &Netns, uplink: &str, vm_iface: &str, site: SiteConfig) -> Attached {
    movarto_lab::triangle::attach_in(ns, uplink, vm_iface, site, aya::programs::XdpMode::Default)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// movarto's programs, unconfigured (they pass everything), on `devs` in `ns`; see
/// [`movarto_lab::triangle::pass_through_xdp`]. Detached on drop.
pub fn pass_through_xdp(ns: &Netns, devs: &[&str]) -> Datapath {
    movarto_lab::triangle::pass_through_xdp(ns, devs).unwrap_or_else(|e| panic!("{e:#}"))
}
