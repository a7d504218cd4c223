//! The command line's units: the library's (`movarto_user::units`), so flags and the
//! inventory read `5s` and `125` (MiB/s) alike.

pub use movarto_user::units::*;
