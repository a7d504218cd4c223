//! Newtypes for the values both sites and the orchestrator exchange: the session token
//! and MAC addresses. Text forms are the ones users type; serde (feature `user`) uses
//! the same strings, so the wire and the command line agree.

use core::{fmt, str::FromStr};

/// A migration's 64-bit session token, carried in GUE private data. Text: hex, with
/// or without `0x`; printed as 16 lowercase hex digits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SessionToken(pub u64);

impl SessionToken {
    /// Whether this is the all-zero token (no authentication).
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

/// A text that is not a token or a MAC address; says what was expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not 1 to 16 hex digits.
    Token,
    /// Not six hex bytes separated by `:`.
    Mac,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::Token => "a session token is 1 to 16 hex digits (optionally after 0x)",
            ParseError::Mac => "a MAC address is six hex bytes separated by ':'",
        })
    }
}

impl core::error::Error for ParseError {}

impl FromStr for SessionToken {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix("0x").unwrap_or(s);
        if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseError::Token);
        }
        u64::from_str_radix(hex, 16)
            .map(SessionToken)
            .map_err(|_| ParseError::Token)
    }
}

impl fmt::Display for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// An Ethernet MAC address. Text: `02:00:00:00:00:01`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const ZERO: MacAddr = MacAddr([0; 6]);
}

impl FromStr for MacAddr {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or(ParseError::Mac)?;
            if part.len() != 2 {
                return Err(ParseError::Mac);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ParseError::Mac)?;
        }
        if parts.next().is_some() {
            return Err(ParseError::Mac);
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Serde as the text forms above.
#[cfg(feature = "user")]
mod text_serde {
    use std::string::String;

    use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

    use super::{MacAddr, SessionToken};

    macro_rules! as_text {
        ($type:ty) => {
            impl Serialize for $type {
                fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    s.collect_str(self)
                }
            }

            impl<'de> Deserialize<'de> for $type {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    let text = String::deserialize(d)?;
                    text.parse()
                        .map_err(|e| D::Error::custom(std::format!("{text:?}: {e}")))
                }
            }
        };
    }

    as_text!(SessionToken);
    as_text!(MacAddr);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_print_as_hex() {
        let t: SessionToken = "5eed0f6d6f7665".parse().expect("hex");
        assert_eq!(t, SessionToken(0x005e_ed0f_6d6f_7665));
        assert_eq!(
            "0x5eed0f6d6f7665".parse::<SessionToken>(),
            Ok(SessionToken(0x005e_ed0f_6d6f_7665))
        );
        let mut out = [0u8; 16];
        let printed = format_into(&mut out, format_args!("{t}"));
        assert_eq!(printed, "005eed0f6d6f7665");
        for bad in ["", "0x", "xyz", "+1", "12345678901234567", " 1"] {
            assert_eq!(
                bad.parse::<SessionToken>(),
                Err(ParseError::Token),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn macs_parse_and_print() {
        let mac: MacAddr = "02:00:0a:ff:00:01".parse().expect("mac");
        assert_eq!(mac, MacAddr([2, 0, 0x0a, 0xff, 0, 1]));
        let mut out = [0u8; 17];
        assert_eq!(
            format_into(&mut out, format_args!("{mac}")),
            "02:00:0a:ff:00:01"
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "02:00:00:00:00:1g",
            "002:0:0:0:0:1",
            "2:0:0:0:0:1",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(ParseError::Mac), "{bad:?}");
        }
    }

    /// Formats into a stack buffer (this crate is `no_std`).
    fn format_into<'a>(buf: &'a mut [u8], args: fmt::Arguments<'_>) -> &'a str {
        struct Cursor<'b>(&'b mut [u8], usize);
        impl fmt::Write for Cursor<'_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                let end = self.1 + s.len();
                self.0
                    .get_mut(self.1..end)
                    .ok_or(fmt::Error)?
                    .copy_from_slice(s.as_bytes());
                self.1 = end;
                Ok(())
            }
        }
        let mut cursor = Cursor(buf, 0);
        fmt::write(&mut cursor, args).expect("fits");
        let len = cursor.1;
        core::str::from_utf8(&buf[..len]).expect("utf-8")
    }
}
