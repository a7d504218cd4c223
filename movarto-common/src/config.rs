//! The datapath's configuration. The uplink's entry (`CONFIG`, one) holds the
//! node-wide fields: tunnel endpoint, GUE port, tunnel MTU, uplink, gateway MAC.
//! Each service's entry (`SERVICES`, keyed by its `H`, see [`crate::service`])
//! is a whole [`Config`]: its own mode, addresses, peer, token and VM, with the
//! node-wide fields copied in, so a packet needs one lookup. Changing a
//! service's mode is one write of its entry; no program is reloaded.

/// What the datapath does; see the table in DESIGN.md "The datapath".
///
/// With the `user` feature it is also the wire and command-line form (`track`, ...).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize, clap::ValueEnum)
)]
#[cfg_attr(feature = "user", serde(rename_all = "lowercase"))]
pub enum Mode {
    /// Attached, doing nothing but counting (the initial state).
    Idle = 0,
    /// Site A before the move: record flows to/from `H`, clamp MSS.
    Track = 1,
    /// Site A from switchover: tunnel everything for `H` to `TB`.
    Forward = 2,
    /// Site B before and during the drain: unwrap the tunnel, NAT `N` <-> `H`.
    Receive = 3,
    /// Site B after teardown: NAT only.
    Nat = 4,
    /// Site B in `move` address mode: `H` itself is routed to B now. Unwrap the tunnel
    /// for packets that still reach A; everything else (the VM's replies included) goes
    /// the direct way, by the kernel's routing.
    Direct = 5,
    /// Site A again, the VM back from B while B still forwards what reaches `N` (a
    /// move back before the drain ended): traffic to `H` is the VM's own (recorded,
    /// passed), GUE from `TB` is delivered to the VM, and the VM's packets on flows A
    /// did not see itself go back through the tunnel, where B undoes its NAT.
    Return = 6,
}

impl Mode {
    /// Every mode, in value order.
    pub const ALL: [Mode; 7] = [
        Mode::Idle,
        Mode::Track,
        Mode::Forward,
        Mode::Receive,
        Mode::Nat,
        Mode::Direct,
        Mode::Return,
    ];

    /// Whether the mode sends packets on through the host's routing, so the uplink
    /// must have IP forwarding on.
    pub const fn routes_packets(self) -> bool {
        matches!(
            self,
            Mode::Forward | Mode::Receive | Mode::Nat | Mode::Direct | Mode::Return
        )
    }

    /// Whether the mode sends GUE to the peer, whose next hop must then be resolved.
    pub const fn uses_tunnel(self) -> bool {
        matches!(
            self,
            Mode::Forward | Mode::Receive | Mode::Direct | Mode::Return
        )
    }

    pub const fn from_u8(v: u8) -> Option<Mode> {
        match v {
            0 => Some(Mode::Idle),
            1 => Some(Mode::Track),
            2 => Some(Mode::Forward),
            3 => Some(Mode::Receive),
            4 => Some(Mode::Nat),
            5 => Some(Mode::Direct),
            6 => Some(Mode::Return),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::Track => "track",
            Mode::Forward => "forward",
            Mode::Receive => "receive",
            Mode::Nat => "nat",
            Mode::Direct => "direct",
            Mode::Return => "return",
        }
    }
}

/// Key of the uplink's single entry in the `CONFIG` array.
pub const CONFIG_KEY: u32 = 0;

/// Default GUE UDP destination port.
pub const GUE_DEFAULT_PORT: u16 = 6080;

/// The per-site configuration. Addresses use the 16-byte layout of
/// [`crate::flow::FlowKey`]: IPv4 in the first 4 bytes, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// [`Mode`] as a byte.
    pub mode: u8,
    /// Family of `H` and `N` ([`crate::net::family`]).
    pub service_family: u8,
    /// Family of the tunnel endpoints; only IPv4 outer headers for now.
    pub tunnel_family: u8,
    pub _pad0: u8,
    /// GUE destination port, network byte order.
    pub gue_port: u16,
    /// Largest outer packet the tunnel path carries (IP header and up).
    pub tunnel_mtu: u16,
    /// Home address `H`.
    pub home_addr: [u8; 16],
    /// New address `N` (site B, `nat` address mode).
    pub new_addr: [u8; 16],
    /// This site's own tunnel endpoint (`TA` at A, `TB` at B).
    pub local_tunnel_addr: [u8; 16],
    /// The other site's tunnel endpoint.
    pub peer_tunnel_addr: [u8; 16],
    /// The per-migration session token carried in GUE private data.
    pub token: u64,
    /// ifindex of the uplink.
    pub uplink_ifindex: u32,
    /// ifindex of the VM-facing interface (tap or veth).
    pub vm_ifindex: u32,
    /// The VM's MAC, for frames delivered to it.
    pub vm_mac: [u8; 6],
    /// The VM-facing interface's (anycast gateway) MAC.
    pub gateway_mac: [u8; 6],
    /// The service's row of the per-service counters (`SERVICE_COUNTERS`), chosen
    /// by userspace when the service is added.
    pub slot: u32,
    /// Cookie of the network namespace the datapath was attached in
    /// (`SO_NETNS_COOKIE`). Not used by the programs: it tells userspace whose
    /// pins these are, since bpffs is shared by all network namespaces.
    pub netns_cookie: u64,
}

impl core::fmt::Display for Mode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl Config {
    pub const fn mode(&self) -> Option<Mode> {
        Mode::from_u8(self.mode)
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integers and byte arrays only, padding explicit.
unsafe impl aya::Pod for Config {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_fixed() {
        assert_eq!(core::mem::size_of::<Config>(), 112);
        assert_eq!(core::mem::align_of::<Config>(), 8);
    }

    #[test]
    fn modes_round_trip() {
        for m in Mode::ALL {
            assert_eq!(Mode::from_u8(m as u8), Some(m));
        }
        assert_eq!(Mode::from_u8(Mode::ALL.len() as u8), None);
    }
}
