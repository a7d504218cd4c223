//! TCP MSS clamping on SYN and SYN-ACK, so connections opened while tracking
//! never need fragmenting once they are tunnelled.

use aya_ebpf::programs::TcContext;
use movarto_common::{checksum, counters::Counter};

use crate::{
    counters::bump,
    parse::{Packet, bytes, bytes_mut, tcp_flag},
};

/// TCP option kinds.
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
/// Options fill at most 40 bytes; this bounds the walk for the verifier.
const MAX_OPTIONS: usize = 12;
/// Offset of the checksum inside the TCP header.
const TCP_CHECK_OFFSET: usize = 16;

/// Whether `pkt` is a SYN (with or without ACK) whose MSS we may clamp.
#[inline(always)]
pub fn is_syn(pkt: &Packet) -> bool {
    pkt.tcp_flags & tcp_flag::SYN != 0
}

/// Frame offset of the 2-byte MSS value in the TCP options of `pkt`, if any.
#[inline(always)]
fn find_mss(data: usize, data_end: usize, pkt: &Packet) -> Option<usize> {
    let tcp = bytes::<20>(data, data_end, pkt.l4_offset).ok()?;
    let options_end = pkt.l4_offset + usize::from(tcp[12] >> 4) * 4;
    let mut offset = pkt.l4_offset + 20;
    for _ in 0..MAX_OPTIONS {
        if offset >= options_end {
            return None;
        }
        // Read kind and length together: a 1-byte bounds check is rewritten by
        // LLVM into a form the verifier can't use. No MSS follows a last-byte NOP.
        let option = bytes::<2>(data, data_end, offset).ok()?;
        let kind = option[0];
        match kind {
            OPT_END => return None,
            OPT_NOP => {
                offset += 1;
                continue;
            }
            _ => {}
        }
        let len = usize::from(option[1]);
        if kind == OPT_MSS {
            return (len == 4 && offset + 4 <= options_end).then_some(offset + 2);
        }
        if len < 2 {
            return None;
        }
        offset += len;
    }
    None
}

/// XDP: lowers the MSS of a SYN/SYN-ACK to `max_mss` in place and fixes the
/// TCP checksum incrementally (XDP frames carry a full checksum).
#[inline(always)]
pub fn clamp_xdp(data: usize, data_end: usize, pkt: &Packet, max_mss: u16) {
    let Some(at) = find_mss(data, data_end, pkt) else {
        return;
    };
    // Both writes go through pointers checked right here: LLVM drops checks it
    // can prove from earlier ones, and the verifier then loses the range.
    let Ok(tcp) = bytes_mut::<20>(data, data_end, pkt.l4_offset) else {
        return;
    };
    let Ok(mss) = bytes_mut::<2>(data, data_end, at) else {
        return;
    };
    let old = u16::from_be_bytes(*mss);
    if old <= max_mss {
        return;
    }
    *mss = max_mss.to_be_bytes();
    let check = u16::from_be_bytes([tcp[TCP_CHECK_OFFSET], tcp[TCP_CHECK_OFFSET + 1]]);
    let [hi, lo] = checksum::replace16(check, old, max_mss).to_be_bytes();
    tcp[TCP_CHECK_OFFSET] = hi;
    tcp[TCP_CHECK_OFFSET + 1] = lo;
    bump(Counter::MssClamped);
}

/// TC: the same through the skb helpers, which also handle a checksum that
/// offload left partial (then only the field changes, not the sum).
#[inline(always)]
pub fn clamp_tc(ctx: &TcContext, pkt: &Packet, max_mss: u16) {
    let Some(at) = find_mss(ctx.data(), ctx.data_end(), pkt) else {
        return;
    };
    let Ok(mss) = bytes::<2>(ctx.data(), ctx.data_end(), at) else {
        return;
    };
    let old_wire = u16::from_ne_bytes(*mss);
    if u16::from_be_bytes(*mss) <= max_mss {
        return;
    }
    let new_wire = max_mss.to_be();
    if ctx.store(at, &new_wire, 0).is_err() {
        return;
    }
    let check_at = pkt.l4_offset + TCP_CHECK_OFFSET;
    if ctx
        .l4_csum_replace(check_at, u64::from(old_wire), u64::from(new_wire), 2)
        .is_ok()
    {
        bump(Counter::MssClamped);
    }
}
