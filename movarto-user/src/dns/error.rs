//! DNS failures, each naming the server, the zone and the key so an operator can act on it.

use std::{fmt, net::SocketAddr, time::Duration};

use hickory_proto::{op::ResponseCode, rr::rdata::tsig::TsigError};

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
#[error("{kind} (server {server}, zone {zone}, key {})", key.as_deref().unwrap_or("none"))]
pub struct DnsError {
    pub server: SocketAddr,
    pub zone: String,
    /// `name (algorithm)`, or `None` for unsigned queries.
    pub key: Option<String>,
    pub kind: DnsErrorKind,
}

#[derive(Debug, PartialEq)]
pub enum DnsErrorKind {
    /// No answer in time.
    Timeout {
        after: Duration,
        transport: &'static str,
    },
    /// Sending or receiving failed.
    Io(String),
    /// The server answered with an error RCODE, and possibly a TSIG error.
    Rcode {
        rcode: ResponseCode,
        tsig: Option<TsigError>,
    },
    /// A query was refused: the server does not serve the zone to this client.
    QueryRefused,
    /// An RFC 2136 prerequisite did not hold: someone else changed the records.
    /// The server applied nothing.
    PrerequisiteFailed { rcode: ResponseCode },
    /// The response to a signed request carried no TSIG.
    UnsignedResponse,
    /// The response's TSIG did not verify.
    BadResponseSignature(String),
    /// The response could not be decoded or does not belong to the request.
    Malformed(String),
}

impl DnsErrorKind {
    /// A short stable name for JSON output and tests.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "TIMEOUT",
            Self::Io(_) => "IO",
            Self::Rcode {
                tsig: Some(TsigError::BadKey),
                ..
            } => "BADKEY",
            Self::Rcode {
                tsig: Some(TsigError::BadSig),
                ..
            } => "BADSIG",
            Self::Rcode {
                tsig: Some(TsigError::BadTime),
                ..
            } => "BADTIME",
            Self::Rcode { rcode, .. } => match rcode {
                ResponseCode::NotAuth => "NOTAUTH",
                ResponseCode::Refused => "REFUSED",
                ResponseCode::NXDomain => "NXDOMAIN",
                ResponseCode::ServFail => "SERVFAIL",
                ResponseCode::NotZone => "NOTZONE",
                ResponseCode::FormErr => "FORMERR",
                _ => "RCODE",
            },
            Self::QueryRefused => "REFUSED",
            Self::PrerequisiteFailed { .. } => "PREREQUISITE_FAILED",
            Self::UnsignedResponse => "UNSIGNED_RESPONSE",
            Self::BadResponseSignature(_) => "BAD_RESPONSE_SIGNATURE",
            Self::Malformed(_) => "MALFORMED_RESPONSE",
        }
    }
}

impl fmt::Display for DnsErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout { after, transport } => write!(
                f,
                "no answer over {transport} within {after:?}: is the server reachable and listening?"
            ),
            Self::Io(err) => write!(f, "network error: {err}"),
            Self::Rcode {
                rcode,
                tsig: Some(tsig),
            } => {
                let rcode = rcode_name(*rcode);
                match tsig {
                    TsigError::BadKey => write!(
                        f,
                        "the server does not know this TSIG key ({rcode}/BADKEY): the key name and algorithm must match a `key` statement on the server"
                    ),
                    TsigError::BadSig => write!(
                        f,
                        "the server rejected the TSIG signature ({rcode}/BADSIG): the key's secret differs from the server's"
                    ),
                    TsigError::BadTime => write!(
                        f,
                        "the server rejected the signature's time ({rcode}/BADTIME): the clocks differ by more than the {} s fudge",
                        super::key::TSIG_FUDGE
                    ),
                    TsigError::BadTrunc => {
                        write!(f, "the server rejected a truncated MAC ({rcode}/BADTRUNC)")
                    }
                    TsigError::Unknown(code) => {
                        write!(f, "the server answered {rcode} with TSIG error {code}")
                    }
                }
            }
            Self::Rcode { rcode, tsig: None } => match rcode {
                ResponseCode::NotAuth => write!(
                    f,
                    "the server is not authoritative for the zone (NOTAUTH): check --zone and --server"
                ),
                ResponseCode::Refused => write!(
                    f,
                    "the server refused the request (REFUSED): its allow-update/update-policy does not let this key change this name"
                ),
                ResponseCode::NXDomain => write!(f, "the name does not exist (NXDOMAIN)"),
                ResponseCode::NotZone => {
                    write!(f, "the name is not inside the zone (NOTZONE)")
                }
                other => write!(f, "the server answered {}", rcode_name(*other)),
            },
            Self::QueryRefused => write!(
                f,
                "the server refused the query (REFUSED): it does not serve this zone to this client; check --zone and --server"
            ),
            Self::PrerequisiteFailed { rcode } => write!(
                f,
                "prerequisite failed ({}): the records are no longer what movarto expected (someone else changed them); the server changed nothing",
                rcode_name(*rcode)
            ),
            Self::UnsignedResponse => write!(
                f,
                "the response to a signed request is not signed: it cannot be trusted"
            ),
            Self::BadResponseSignature(why) => {
                write!(f, "the response's TSIG does not verify: {why}")
            }
            Self::Malformed(why) => write!(f, "unusable response: {why}"),
        }
    }
}

/// The RCODE mnemonic operators know from dig and nsupdate.
pub fn rcode_name(rcode: ResponseCode) -> String {
    match rcode {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::YXDomain => "YXDOMAIN".into(),
        ResponseCode::YXRRSet => "YXRRSET".into(),
        ResponseCode::NXRRSet => "NXRRSET".into(),
        ResponseCode::NotAuth => "NOTAUTH".into(),
        ResponseCode::NotZone => "NOTZONE".into(),
        other => format!("RCODE {}", u16::from(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(kind: DnsErrorKind) -> String {
        DnsError {
            server: "192.0.2.53:53".parse().expect("addr"),
            zone: "example.test.".into(),
            key: Some("mv-key. (hmac-sha256)".into()),
            kind,
        }
        .to_string()
    }

    #[test]
    fn messages_name_server_zone_and_key() {
        let cases = [
            (
                DnsErrorKind::Rcode {
                    rcode: ResponseCode::NotAuth,
                    tsig: Some(TsigError::BadKey),
                },
                "BADKEY",
            ),
            (
                DnsErrorKind::Rcode {
                    rcode: ResponseCode::NotAuth,
                    tsig: Some(TsigError::BadSig),
                },
                "BADSIG",
            ),
            (
                DnsErrorKind::Rcode {
                    rcode: ResponseCode::NotAuth,
                    tsig: Some(TsigError::BadTime),
                },
                "BADTIME",
            ),
            (
                DnsErrorKind::Rcode {
                    rcode: ResponseCode::NotAuth,
                    tsig: None,
                },
                "NOTAUTH",
            ),
            (
                DnsErrorKind::Rcode {
                    rcode: ResponseCode::Refused,
                    tsig: None,
                },
                "REFUSED",
            ),
            (
                DnsErrorKind::Rcode {
                    rcode: ResponseCode::NXDomain,
                    tsig: None,
                },
                "NXDOMAIN",
            ),
            (
                DnsErrorKind::Timeout {
                    after: Duration::from_secs(2),
                    transport: "UDP",
                },
                "no answer over UDP",
            ),
            (
                DnsErrorKind::PrerequisiteFailed {
                    rcode: ResponseCode::NXRRSet,
                },
                "NXRRSET",
            ),
        ];
        for (kind, word) in cases {
            let code = kind.code();
            let text = error(kind);
            assert!(text.contains(word), "{text}");
            assert!(text.contains("192.0.2.53:53"), "{text}");
            assert!(text.contains("example.test."), "{text}");
            assert!(text.contains("mv-key."), "{text}");
            assert!(!code.is_empty());
        }
    }
}
