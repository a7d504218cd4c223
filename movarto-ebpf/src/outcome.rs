//! What a mode handler decided, counted and turned into a return code by the entry point.
//!
//! Mode handlers are separate BPF functions (`#[inline(never)]`) so each gets
//! its own stack frame instead of sharing the entry point's 512 bytes; a BPF
//! call returns one register, hence [`Encoded`].

use movarto_common::counters::Counter;

pub enum Outcome {
    /// Leave the packet to the kernel.
    Pass,
    /// Sent (XDP_TX or a redirect); counted under the verdict counter.
    Sent(u32, Counter),
    /// Dropped for the counted reason.
    Drop(Counter),
    /// To be encapsulated by the tunnel path, a separate BPF function.
    Tunnel,
    /// Left to the kernel after movarto changed it (NAT out): the event counter,
    /// counted by the entry point beside the pass verdict.
    PassAfter(Counter),
}

/// An [`Outcome`] in one u64: kind in bits 48.., action in 16..48, counter in 0..16.
#[repr(transparent)]
pub struct Encoded(u64);

const PASS: u64 = 0;
const SENT: u64 = 1;
const DROP: u64 = 2;
const TUNNEL: u64 = 3;
const PASS_AFTER: u64 = 4;

impl From<Result<Outcome, Counter>> for Encoded {
    #[inline(always)]
    fn from(r: Result<Outcome, Counter>) -> Self {
        Encoded(match r.unwrap_or_else(Outcome::Drop) {
            Outcome::Pass => PASS << 48,
            Outcome::Sent(action, counter) => {
                (SENT << 48) | (u64::from(action) << 16) | counter as u64
            }
            Outcome::Drop(counter) => (DROP << 48) | counter as u64,
            Outcome::Tunnel => TUNNEL << 48,
            Outcome::PassAfter(counter) => (PASS_AFTER << 48) | counter as u64,
        })
    }
}

/// A decoded [`Encoded`]: counters travel as raw indexes (a lookup table
/// would add a `.rodata` map to the object).
pub enum Decoded {
    Pass,
    Sent(u32, u32),
    Drop(u32),
    Tunnel,
    PassAfter(u32),
}

impl Encoded {
    #[inline(always)]
    pub fn decode(self) -> Decoded {
        let counter = (self.0 & 0xffff) as u32;
        match self.0 >> 48 {
            SENT => Decoded::Sent(((self.0 >> 16) & 0xffff_ffff) as u32, counter),
            DROP => Decoded::Drop(counter),
            TUNNEL => Decoded::Tunnel,
            PASS_AFTER => Decoded::PassAfter(counter),
            _ => Decoded::Pass,
        }
    }
}
