//! DNS failures, each naming the server, the zone and the key so an operator can act on it.

use std::{net::SocketAddr, time::Duration};

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

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum DnsErrorKind {
    /// No answer in time.
    #[error("no answer over {transport} within {after:?}: is the server reachable and listening?")]
    Timeout {
        after: Duration,
        transport: &'static str,
    },
    /// Sending or receiving failed.
    #[error("network error: {0}")]
    Io(String),
    /// The server answered with an error RCODE, and possibly a TSIG error.
    #[error("{}", rcode_message(*rcode, tsig.as_ref()))]
    Rcode {
        rcode: ResponseCode,
        tsig: Option<TsigError>,
    },
    /// A query was refused: the server does not serve the zone to this client.
    #[error(
        "the server refused the query (REFUSED): it does not serve this zone to this client; check --zone and --server"
    )]
    QueryRefused,
    /// An RFC 2136 prerequisite did not hold: someone else changed the records.
    /// The server applied nothing.
    #[error(
        "prerequisite failed ({}): the records are no longer what movarto expected (someone else changed them); the server changed nothing",
        rcode_name(*rcode)
    )]
    PrerequisiteFailed { rcode: ResponseCode },
    /// The response to a signed request carried no TSIG.
    #[error("the response to a signed request is not signed: it cannot be trusted")]
    UnsignedResponse,
    /// The response's TSIG did not verify.
    #[error("the response's TSIG does not verify: {0}")]
    BadResponseSignature(String),
    /// The response could not be decoded or does not belong to the request.
    #[error("unusable response: {0}")]
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

/// What an error RCODE (and its TSIG error, if any) means for the operator.
fn rcode_message(rcode: ResponseCode, tsig: Option<&TsigError>) -> String {
    let name = rcode_name(rcode);
    match (tsig, rcode) {
        (Some(TsigError::BadKey), _) => format!(
            "the server does not know this TSIG key ({name}/BADKEY): the key name and algorithm must match a `key` statement on the server"
        ),
        (Some(TsigError::BadSig), _) => format!(
            "the server rejected the TSIG signature ({name}/BADSIG): the key's secret differs from the server's"
        ),
        (Some(TsigError::BadTime), _) => format!(
            "the server rejected the signature's time ({name}/BADTIME): the clocks differ by more than the {} s fudge",
            super::key::TSIG_FUDGE
        ),
        (Some(TsigError::BadTrunc), _) => {
            format!("the server rejected a truncated MAC ({name}/BADTRUNC)")
        }
        (Some(TsigError::Unknown(code)), _) => {
            format!("the server answered {name} with TSIG error {code}")
        }
        (None, ResponseCode::NotAuth) => {
            "the server is not authoritative for the zone (NOTAUTH): check --zone and --server"
                .into()
        }
        (None, ResponseCode::Refused) => "the server refused the request (REFUSED): its allow-update/update-policy does not let this key change this name".into(),
        (None, ResponseCode::NXDomain) => "the name does not exist (NXDOMAIN)".into(),
        (None, ResponseCode::NotZone) => "the name is not inside the zone (NOTZONE)".into(),
        (None, other) => format!("the server answered {}", rcode_name(other)),
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
