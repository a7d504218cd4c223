//! The orchestrator (`movarto-user migrate`). It lowers the TTL, creates the migration at
//! the source's agent and follows it through DESIGN.md's steps, doing the DNS work as it
//! falls due, and reports. The agents own the migration (agent/migrations): this process
//! may die, and `migrate --resume ID` follows it again.
//!
//! Before switchover any failure rolls back (the source's agent does it): the VM keeps
//! running at A, DNS is unchanged (the TTL restored), B is cleaned up and A tracks again.
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`plan`] | [`MigrateOptions`] (what the caller asks) and the checked [`Plan`] |
//! | `steps` | the run: create, follow step by step, DNS; [`run_plan`] and [`resume`] |
//! | `interrupt` | Ctrl-C and SIGTERM: roll back before switchover, detach after |
//! | `timeline` | progress on stderr (text or JSON) and the step records |
//! | [`progress`] | the [`Step`] enum and the [`ProgressEvent`]s |
//! | [`report`] | the report: step table and figures |
//! | [`evacuate`] | many VMs off one site: placement, concurrency, the shared bandwidth |

pub mod evacuate;
mod interrupt;
pub mod plan;
pub mod progress;
pub mod report;
mod steps;
mod timeline;

pub use plan::{AddressMode, DnsTarget, MigrateOptions, Plan};
pub use progress::{ProgressEvent, Step};
pub use steps::{resume, run_plan};
pub use timeline::ProgressFormat;
