//! The command line: one thin file per verb (parse, call the library, print). The
//! library (`movarto_user::*`) has no clap types.

pub mod agent;
pub mod attach;
pub mod check;
pub mod detach;
pub mod dns;
pub mod flows;
pub mod mode;
pub mod status;
pub mod units;
pub mod vm;
