//! The command line: one thin file per verb (parse, call the library, print). The
//! library (`movarto_user::*`) has no clap types.

#[cfg_attr(
    not(test),
    expect(dead_code, reason = "the verbs move into cli/ next and use these")
)]
pub mod units;
