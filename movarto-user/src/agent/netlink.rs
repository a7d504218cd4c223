//! What the agent asks the kernel over rtnetlink, in the calling thread's network
//! namespace: an interface's MAC and counters, and the tunnel's next hop toward the peer and whether its
//! link-layer address is known (`bpf_fib_lookup` drops while it is not).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, IpVersion, RouteMessageBuilder,
    packet_route::{
        link::{LinkAttribute, Stats64},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage},
    },
};

/// Runs `query` on a connection of its own.
pub async fn session<T, Fut>(query: impl FnOnce(Handle) -> Fut) -> Result<T>
where
    Fut: Future<Output = Result<T>>,
{
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(connection);
    let result = query(handle).await;
    task.abort();
    result
}

/// [`session`] for synchronous callers, inside the agent's runtime or not: on a thread of its
/// own (which starts in the caller's network namespace) with a runtime of its own.
pub fn blocking<T: Send, Fut>(query: impl FnOnce(Handle) -> Fut + Send) -> Result<T>
where
    Fut: Future<Output = Result<T>>,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting a runtime for rtnetlink")?
                    .block_on(session(query))
            })
            .join()
            .map_err(|_| anyhow!("the rtnetlink thread panicked"))?
    })
}

/// The MAC address of `iface`.
pub fn mac_of(iface: &str) -> Result<[u8; 6]> {
    blocking(|handle| async move {
        link_attribute(&handle, iface, |attr| match attr {
            LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
            _ => None,
        })
        .await?
        .with_context(|| format!("{iface} has no Ethernet address"))
    })
}

/// `iface`'s `tx_dropped` (its 64-bit link statistics).
pub async fn tx_dropped(iface: &str) -> Result<u64> {
    let name = iface.to_owned();
    session(|handle| async move { stats_of(&handle, &name).await })
        .await
        .map(|stats| stats.tx_dropped)
}

/// `iface`'s queue length in frames (`txqueuelen`), from a thread that is not async.
pub fn tx_queue_len(iface: &str) -> Result<u32> {
    blocking(|handle| async move {
        link_attribute(&handle, iface, |attr| match attr {
            LinkAttribute::TxQueueLen(frames) => Some(*frames),
            _ => None,
        })
        .await?
        .with_context(|| format!("{iface} has no queue length"))
    })
}

/// `iface`'s `tx_packets`, from a thread that is not async.
pub fn tx_packets(iface: &str) -> Result<u64> {
    blocking(|handle| async move { stats_of(&handle, iface).await }).map(|stats| stats.tx_packets)
}

async fn stats_of(handle: &Handle, name: &str) -> Result<Stats64> {
    link_attribute(handle, name, |attr| match attr {
        LinkAttribute::Stats64(stats) => Some(*stats),
        _ => None,
    })
    .await?
    .with_context(|| format!("{name} has no statistics"))
}

/// The first attribute of interface `name` that `pick` takes.
async fn link_attribute<T>(
    handle: &Handle,
    name: &str,
    pick: impl Fn(&LinkAttribute) -> Option<T>,
) -> Result<Option<T>> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("looking up interface {name}"))?
        .with_context(|| format!("no interface named {name}"))?;
    Ok(link.attributes.iter().find_map(pick))
}

/// Where packets toward a destination go next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The route's gateway, or the destination itself when it is on-link.
    pub addr: Ipv4Addr,
    /// The output interface.
    pub ifindex: u32,
}

impl NextHop {
    /// The next hop of `route`, the kernel's answer to RTM_GETROUTE for `dst`.
    pub fn of_route(dst: Ipv4Addr, route: &RouteMessage) -> Option<Self> {
        let mut hop = Self {
            addr: dst,
            ifindex: 0,
        };
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(gateway)) => hop.addr = *gateway,
                RouteAttribute::Oif(index) => hop.ifindex = *index,
                _ => {}
            }
        }
        (hop.ifindex != 0).then_some(hop)
    }

    /// Whether `neighbour` is this hop's entry with a usable link-layer address: the states
    /// the kernel counts as valid (NUD_VALID), as `bpf_fib_lookup` does.
    pub fn resolved_by(&self, neighbour: &NeighbourMessage) -> bool {
        let valid = matches!(
            neighbour.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
        let mut is_hop = false;
        let mut has_lladdr = false;
        for attr in &neighbour.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(addr)) => {
                    is_hop = *addr == self.addr;
                }
                NeighbourAttribute::LinkLocalAddress(lladdr) => {
                    has_lladdr = lladdr.iter().any(|b| *b != 0);
                }
                _ => {}
            }
        }
        valid && is_hop && has_lladdr && neighbour.header.ifindex == self.ifindex
    }
}

/// The next hop toward `dst` by the kernel's routing (RTM_GETROUTE).
async fn route_to(handle: &Handle, dst: Ipv4Addr) -> Result<NextHop> {
    let request = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, 32)
        .build();
    let route = handle
        .route()
        .get(request)
        .execute()
        .try_next()
        .await
        .with_context(|| format!("looking up the route to {dst}"))?
        .with_context(|| format!("no route to {dst}"))?;
    NextHop::of_route(dst, &route).with_context(|| format!("the route to {dst} has no interface"))
}

/// Whether the kernel's IPv4 neighbour table has `hop` resolved.
async fn is_resolved(handle: &Handle, hop: &NextHop) -> Result<bool> {
    let mut neighbours = handle
        .neighbours()
        .get()
        .set_family(IpVersion::V4)
        .execute();
    while let Some(neighbour) = neighbours
        .try_next()
        .await
        .context("reading the neighbour table")?
    {
        if hop.resolved_by(&neighbour) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The next hop toward `dst`, and whether it is resolved.
pub fn next_hop(dst: Ipv4Addr) -> Result<(NextHop, bool)> {
    wait_for_next_hop(dst, Duration::ZERO)
}

/// Waits up to `wait` for the next hop toward `dst` to be resolved; returns it and whether
/// it was. Something must make the kernel resolve it, e.g. a datagram toward `dst`.
pub fn wait_for_next_hop(dst: Ipv4Addr, wait: Duration) -> Result<(NextHop, bool)> {
    if dst.is_unspecified() {
        bail!("no tunnel peer configured");
    }
    blocking(|handle| async move {
        let hop = route_to(&handle, dst).await?;
        let deadline = Instant::now() + wait;
        loop {
            if is_resolved(&handle, &hop).await? {
                return Ok((hop, true));
            }
            if Instant::now() >= deadline {
                return Ok((hop, false));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::neighbour::NeighbourHeader;

    use super::*;

    const PEER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn route(attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut route = RouteMessage::default();
        route.attributes = attributes;
        route
    }

    fn neighbour(
        addr: Ipv4Addr,
        ifindex: u32,
        state: NeighbourState,
        mac: &[u8],
    ) -> NeighbourMessage {
        let mut neighbour = NeighbourMessage::default();
        neighbour.header = NeighbourHeader {
            ifindex,
            state,
            ..NeighbourHeader::default()
        };
        neighbour.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet(addr)),
            NeighbourAttribute::LinkLocalAddress(mac.to_vec()),
        ];
        neighbour
    }

    #[test]
    fn the_next_hop_is_the_gateway_or_the_peer_on_link() {
        let via = route(vec![
            RouteAttribute::Destination(RouteAddress::Inet(PEER)),
            RouteAttribute::Gateway(RouteAddress::Inet(ROUTER)),
            RouteAttribute::Oif(3),
        ]);
        assert_eq!(
            NextHop::of_route(PEER, &via),
            Some(NextHop {
                addr: ROUTER,
                ifindex: 3
            })
        );
        let on_link = route(vec![RouteAttribute::Oif(3)]);
        assert_eq!(
            NextHop::of_route(PEER, &on_link),
            Some(NextHop {
                addr: PEER,
                ifindex: 3
            })
        );
        assert_eq!(NextHop::of_route(PEER, &route(vec![])), None);
    }

    #[test]
    fn only_the_hops_own_valid_entry_counts() {
        let hop = NextHop {
            addr: ROUTER,
            ifindex: 3,
        };
        for state in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Permanent,
        ] {
            assert!(hop.resolved_by(&neighbour(ROUTER, 3, state, &MAC)));
        }
        // Another neighbour on the same interface, complete or not, says nothing of the hop.
        assert!(!hop.resolved_by(&neighbour(OTHER, 3, NeighbourState::Reachable, &MAC)));
        assert!(!hop.resolved_by(&neighbour(OTHER, 3, NeighbourState::Permanent, &MAC)));
        // The hop's address on another interface, or still unresolved.
        assert!(!hop.resolved_by(&neighbour(ROUTER, 4, NeighbourState::Reachable, &MAC)));
        for state in [
            NeighbourState::Incomplete,
            NeighbourState::Failed,
            NeighbourState::None,
        ] {
            assert!(!hop.resolved_by(&neighbour(ROUTER, 3, state, &MAC)));
        }
        assert!(!hop.resolved_by(&neighbour(ROUTER, 3, NeighbourState::Reachable, &[0; 6])));
    }
}
