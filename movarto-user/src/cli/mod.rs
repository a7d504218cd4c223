//! The command line: one thin file per verb (parse, call the library, print). The
//! library (`movarto_user::*`) has no clap types.

pub mod migrate;
pub mod units;
