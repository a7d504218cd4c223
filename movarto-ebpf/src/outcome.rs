//! What a mode handler decided, counted and turned into a return code by the entry point.

use movarto_common::counters::Counter;

pub enum Outcome {
    /// Leave the packet to the kernel.
    Pass,
    /// Sent (XDP_TX or a redirect); counted under the verdict counter.
    Sent(u32, Counter),
    /// Dropped for the counted reason.
    Drop(Counter),
}

impl From<Result<Outcome, Counter>> for Outcome {
    fn from(r: Result<Outcome, Counter>) -> Self {
        r.unwrap_or_else(Outcome::Drop)
    }
}
