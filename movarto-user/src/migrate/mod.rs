//! The orchestrator (`movarto-user migrate`). It drives both sites' agents through the
//! sequence of DESIGN.md as named, timed steps, and reports.
//!
//! Before switchover any failure rolls back: the VM keeps running at A, DNS is unchanged
//! (the TTL restored), B is cleaned up and A goes back to `track`.
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`plan`] | [`MigrateOptions`] (what the caller asks) and the checked [`Plan`] |
//! | `steps` | the run: its phases, one function per step, [`run_plan`] |
//! | `drain` | step 9: watching A until the pre-move flows are gone |
//! | `interrupt` | Ctrl-C and SIGTERM: roll back before switchover |
//! | `rollback` | what was changed, and undoing it before switchover |
//! | `timeline` | progress on stderr (text or JSON) and the step records |
//! | [`progress`] | the [`Step`] enum and the [`ProgressEvent`]s |
//! | [`report`] | the report: step table and figures |

mod drain;
mod interrupt;
pub mod plan;
pub mod progress;
pub mod report;
mod rollback;
mod steps;
mod timeline;

pub use plan::{AddressMode, DnsTarget, MigrateOptions, Plan};
pub use progress::{ProgressEvent, Step};
pub use steps::run_plan;
pub use timeline::ProgressFormat;
