//! Routing with the kernel's FIB (`bpf_fib_lookup`): next hop and MACs, never hard-coded.

use core::{ffi::c_void, mem};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup, xdp_action},
    helpers::{bpf_redirect, generated},
    programs::{TcContext, XdpContext},
};
use movarto_common::{counters::Counter, net::family};

use crate::parse::bytes_mut;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where a packet leaves and with which MACs.
pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// How a lookup is made.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The packet originates here (outer GUE headers from our endpoint): an
    /// output-route lookup out of `ifindex`, independent of the forwarding sysctl.
    Output,
    /// The packet is forwarded (a decapsulated packet on its way to its
    /// destination): needs forwarding enabled on the interface, as a router does.
    Forward,
}

/// A `bpf_fib_lookup` request, 8-aligned so it can be zeroed a word at a time.
#[repr(C, align(8))]
union FibRequest {
    params: bpf_fib_lookup,
    words: [u64; FIB_REQUEST_WORDS],
}

const FIB_REQUEST_WORDS: usize = mem::size_of::<bpf_fib_lookup>() / 8;
const _: () = assert!(mem::size_of::<bpf_fib_lookup>() == 8 * FIB_REQUEST_WORDS);

/// Looks `dst` up (from `src`, arriving on `ifindex`). An unresolved
/// neighbour is a failure too: XDP can't queue the packet while ARP runs, so
/// userspace resolves the peer endpoint before switching modes.
#[inline(always)]
pub fn lookup(
    ctx: *mut c_void,
    fam: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    ifindex: u32,
    tot_len: u16,
    how: Lookup,
) -> Result<NextHop, Counter> {
    let mut request = mem::MaybeUninit::<FibRequest>::uninit();
    let zeroed = request.as_mut_ptr().cast::<u64>();
    for i in 0..FIB_REQUEST_WORDS {
        // SAFETY: `i` words of 8 bytes are inside the request, which is 8-aligned.
        // Volatile, so LLVM does not turn the stores back into a `memset` call (the
        // BPF backend's is a byte-by-byte loop: 64 iterations on every routed packet).
        unsafe { zeroed.add(i).write_volatile(0) };
    }
    // SAFETY: every byte was just zeroed, and an all-zero bpf_fib_lookup is a valid
    // (empty) request.
    let params = unsafe { &mut (*request.as_mut_ptr()).params };
    params.ifindex = ifindex;
    params.__bindgen_anon_1.tot_len = tot_len;
    if fam == family::IPV6 {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = words(src);
        params.__bindgen_anon_4.ipv6_dst = words(dst);
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
    }
    let flags = match how {
        Lookup::Output => BPF_FIB_LOOKUP_OUTPUT,
        Lookup::Forward => 0,
    };
    // SAFETY: `params` is a valid, sized request; `ctx` is the program's context.
    let ret = unsafe {
        generated::bpf_fib_lookup(ctx, params, mem::size_of::<bpf_fib_lookup>() as i32, flags)
    };
    if ret != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return Err(Counter::DropNoRoute);
    }
    Ok(NextHop {
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
    })
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Writes the next hop's MACs into the frame's Ethernet header and sends it:
/// back out the same port with `XDP_TX`, otherwise with a redirect.
#[inline(always)]
pub fn transmit_xdp(ctx: &XdpContext, hop: &NextHop) -> Result<u32, Counter> {
    let eth =
        bytes_mut::<12>(ctx.data(), ctx.data_end(), 0).map_err(|_| Counter::DropResizeFailed)?;
    eth[..6].copy_from_slice(&hop.dmac);
    eth[6..].copy_from_slice(&hop.smac);
    if hop.ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(xdp_action::XDP_TX);
    }
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as u32)
}

/// TC: the same for an skb; always a redirect (TC ingress can't "send back").
#[inline(always)]
pub fn transmit_tc(ctx: &TcContext, hop: &NextHop) -> Result<u32, Counter> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&hop.dmac);
    macs[6..].copy_from_slice(&hop.smac);
    ctx.store(0, &macs, 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as u32)
}
