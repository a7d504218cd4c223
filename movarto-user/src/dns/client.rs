//! Talking to one authoritative server: UDP with TCP fallback, TSIG on requests and responses.
//!
//! Blocking sockets with timeouts: a DNS exchange is one request and one answer, and async
//! callers run these in `spawn_blocking`.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{Name, TSigVerifier},
};

use super::{
    error::{DnsError, DnsErrorKind},
    key::TsigKey,
};

/// How an answer arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    /// After a truncated UDP answer.
    Tcp,
}

/// The authoritative server of one zone, and how to authenticate to it.
#[derive(Clone, Debug)]
pub struct ZoneServer {
    pub server: SocketAddr,
    pub zone: Name,
    pub key: Option<TsigKey>,
    /// For each transport attempt.
    pub timeout: Duration,
    /// Seconds added to the local clock when signing: 0 in use; tests set it to see BADTIME.
    pub clock_skew_secs: i64,
}

impl ZoneServer {
    pub fn new(server: SocketAddr, zone: Name, key: Option<TsigKey>) -> Self {
        let mut zone = zone;
        zone.set_fqdn(true);
        Self {
            server,
            zone,
            key,
            timeout: Duration::from_secs(3),
            clock_skew_secs: 0,
        }
    }

    pub fn error(&self, kind: DnsErrorKind) -> DnsError {
        DnsError {
            server: self.server,
            zone: self.zone.to_string(),
            key: self.key.as_ref().map(ToString::to_string),
            kind,
        }
    }

    fn io_error(&self, what: &str, err: std::io::Error, transport: &'static str) -> DnsError {
        if matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            self.error(DnsErrorKind::Timeout {
                after: self.timeout,
                transport,
            })
        } else {
            self.error(DnsErrorKind::Io(format!("{what} over {transport}: {err}")))
        }
    }

    /// Sends `message`, signed when `sign` and a key is configured, and returns the checked
    /// response. Error RCODEs become [`DnsError`]s.
    pub fn exchange(&self, message: Message, sign: bool) -> Result<Message, DnsError> {
        self.exchange_with_transport(message, sign)
            .map(|(response, _)| response)
    }

    /// [`Self::exchange`], also saying which transport carried the answer.
    pub fn exchange_with_transport(
        &self,
        mut message: Message,
        sign: bool,
    ) -> Result<(Message, Transport), DnsError> {
        let mut verifier = match (&self.key, sign) {
            (Some(key), true) => {
                let signer = key
                    .signer()
                    .map_err(|err| self.error(DnsErrorKind::Io(format!("{err:#}"))))?;
                message
                    .finalize(
                        &signer,
                        unix_now().saturating_add_signed(self.clock_skew_secs),
                    )
                    .map_err(|err| self.error(DnsErrorKind::Io(format!("signing: {err}"))))?
            }
            _ => None,
        };
        let request = message
            .to_vec()
            .map_err(|err| self.error(DnsErrorKind::Io(format!("encoding the request: {err}"))))?;
        let mut raw = self.udp(&request, message.id)?;
        let mut response = self.decode(&raw, message.id)?;
        let mut transport = Transport::Udp;
        if response.truncation {
            tracing::debug!(server = %self.server, "UDP answer truncated; retrying over TCP");
            raw = self.tcp(&request)?;
            response = self.decode(&raw, message.id)?;
            transport = Transport::Tcp;
        }
        self.check(&raw, &response, verifier.as_mut())?;
        Ok((response, transport))
    }

    fn udp(&self, request: &[u8], id: u16) -> Result<Vec<u8>, DnsError> {
        let local: SocketAddr = if self.server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(local).map_err(|e| self.io_error("binding", e, "UDP"))?;
        socket
            .connect(self.server)
            .map_err(|e| self.io_error("connecting", e, "UDP"))?;
        socket
            .send(request)
            .map_err(|e| self.io_error("sending", e, "UDP"))?;
        let deadline = Instant::now() + self.timeout;
        let mut buf = vec![0u8; 65535];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.error(DnsErrorKind::Timeout {
                    after: self.timeout,
                    transport: "UDP",
                }));
            }
            socket
                .set_read_timeout(Some(left))
                .map_err(|e| self.io_error("setting a timeout", e, "UDP"))?;
            let len = socket
                .recv(&mut buf)
                .map_err(|e| self.io_error("receiving", e, "UDP"))?;
            // Stray datagrams (late answers to other requests) are skipped, not fatal.
            if len >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                buf.truncate(len);
                return Ok(buf);
            }
        }
    }

    fn tcp(&self, request: &[u8]) -> Result<Vec<u8>, DnsError> {
        let mut stream = TcpStream::connect_timeout(&self.server, self.timeout)
            .map_err(|e| self.io_error("connecting", e, "TCP"))?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| self.io_error("setting a timeout", e, "TCP"))?;
        let len = u16::try_from(request.len())
            .map_err(|_| self.error(DnsErrorKind::Io("request larger than 64 KiB".into())))?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(request);
        stream
            .write_all(&framed)
            .map_err(|e| self.io_error("sending", e, "TCP"))?;
        let mut len = [0u8; 2];
        stream
            .read_exact(&mut len)
            .map_err(|e| self.io_error("receiving", e, "TCP"))?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream
            .read_exact(&mut buf)
            .map_err(|e| self.io_error("receiving", e, "TCP"))?;
        Ok(buf)
    }

    fn decode(&self, raw: &[u8], id: u16) -> Result<Message, DnsError> {
        let response = Message::from_vec(raw)
            .map_err(|err| self.error(DnsErrorKind::Malformed(err.to_string())))?;
        if response.id != id || response.message_type != MessageType::Response {
            return Err(self.error(DnsErrorKind::Malformed(format!(
                "answer id {} does not match request id {id}",
                response.id
            ))));
        }
        Ok(response)
    }

    fn check(
        &self,
        raw: &[u8],
        response: &Message,
        verifier: Option<&mut TSigVerifier>,
    ) -> Result<(), DnsError> {
        let tsig_error = response.signature().and_then(|sig| sig.data.error);
        // BADKEY and BADSIG answers are unsigned by design (RFC 8945 §5.3.2), so the TSIG
        // error is reported before verification. Errors change nothing on the server.
        if let Some(tsig) = tsig_error {
            return Err(self.error(DnsErrorKind::Rcode {
                rcode: response.response_code,
                tsig: Some(tsig),
            }));
        }
        if let Some(verifier) = verifier {
            if response.signature().is_none() {
                // A server that did not check our TSIG (e.g. it is not authoritative) says so
                // in the RCODE, which is the more useful message.
                if response.response_code != ResponseCode::NoError {
                    return Err(self.rcode_error(response.response_code));
                }
                return Err(self.error(DnsErrorKind::UnsignedResponse));
            }
            verifier
                .verify(raw)
                .map_err(|err| self.error(DnsErrorKind::BadResponseSignature(err.to_string())))?;
        }
        match response.response_code {
            ResponseCode::NoError => Ok(()),
            rcode if response.op_code != OpCode::Update && rcode == ResponseCode::Refused => {
                Err(self.error(DnsErrorKind::QueryRefused))
            }
            rcode => Err(self.rcode_error(rcode)),
        }
    }

    fn rcode_error(&self, rcode: ResponseCode) -> DnsError {
        match rcode {
            ResponseCode::NXRRSet | ResponseCode::YXRRSet | ResponseCode::YXDomain => {
                self.error(DnsErrorKind::PrerequisiteFailed { rcode })
            }
            rcode => self.error(DnsErrorKind::Rcode { rcode, tsig: None }),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
