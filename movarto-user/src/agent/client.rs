//! A client of one site's agent, as the orchestrator uses it.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result};
use reqwest::Method;
use serde::{Serialize, de::DeserializeOwned};

use super::api::{
    ApiError, DatapathRequest, DatapathStatus, DnsDone, FlowSnapshot, GarpRequest, Health,
    IncomingHalf, Leftovers, MigrationId, MigrationRecord, MigrationSpec, MigrationState,
    ModeRequest, PeerAgent, SiteStatus, Stage, TapRequest, VmRequest, VmStatus,
};
use movarto_common::config::Mode;

/// How long one call may take (starting QEMU and loading the datapath included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The first pause between retries of an unreachable agent, and the longest.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LONGEST_RETRY: Duration = Duration::from_secs(2);

/// Calls `call` until it reaches the agent, with backoff, for up to `limit`: an agent
/// that restarts is back within seconds. What the agent answers (an error too) is final.
/// Every call retried this way must be safe to repeat.
pub async fn retry_unreachable<T, F, Fut>(limit: Duration, mut call: F) -> Result<T, AgentError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, AgentError>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = FIRST_RETRY;
    loop {
        match call().await {
            Err(AgentError::Unreachable { agent, reason })
                if tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::debug!(%agent, "unreachable ({reason}); retrying in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_RETRY);
            }
            Err(AgentError::Unreachable { agent, reason }) => {
                return Err(AgentError::Unreachable {
                    agent,
                    reason: format!("{reason} (retried for {limit:?})"),
                });
            }
            other => return other,
        }
    }
}

/// What went wrong talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No answer (refused, reset, timed out): the agent may be restarting.
    #[error("the agent at {agent} is unreachable: {reason}")]
    Unreachable { agent: String, reason: String },
    /// The agent answered with an error.
    #[error("the agent at {agent} answered {status}: {message}")]
    Refused {
        agent: String,
        status: u16,
        message: String,
    },
}

impl AgentError {
    /// The agent has no such migration or VM.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AgentError::Refused { status: 404, .. })
    }

    /// The agent refused the call as conflicting with the state it is in.
    pub fn is_conflict(&self) -> bool {
        matches!(self, AgentError::Refused { status: 409, .. })
    }
}

#[derive(Clone)]
pub struct AgentClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AgentClient {
    /// `base` is e.g. `https://203.0.113.1:7878`; `ca_cert` (PEM) is trusted for TLS.
    pub fn new(base: &str, token: &str, ca_cert: Option<&Path>) -> Result<Self> {
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(3));
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading the CA certificate {}", path.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("parsing the CA certificate {}", path.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http: builder.build().context("building the HTTP client")?,
        })
    }

    /// A client of the other site's agent, as a migration's spec names it.
    pub fn from_peer(peer: &PeerAgent) -> Result<Self> {
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(3));
        if let Some(pem) = &peer.ca_pem {
            let cert = reqwest::Certificate::from_pem(pem.as_bytes())
                .context("parsing the peer's CA certificate")?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(Self {
            base: peer.url.trim_end_matches('/').to_owned(),
            token: peer.token.clone(),
            http: builder.build().context("building the HTTP client")?,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, AgentError> {
        self.call_with_timeout(method, path, body, CALL_TIMEOUT)
            .await
    }

    async fn call_with_timeout<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        limit: Duration,
    ) -> Result<T, AgentError> {
        let (status, text) = self.call_text(method.clone(), path, body, limit).await?;
        serde_json::from_str(&text).map_err(|err| AgentError::Refused {
            agent: self.base.clone(),
            status,
            message: format!("{method} {path}: unexpected reply ({err}): {text}"),
        })
    }

    /// The reply's status and body, when it is a success.
    async fn call_text(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        limit: Duration,
    ) -> Result<(u16, String), AgentError> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .timeout(limit)
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|err| AgentError::Unreachable {
                agent: self.base.clone(),
                reason: format!("{method} {path}: {}", error_chain(&err)),
            })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|err| AgentError::Unreachable {
                agent: self.base.clone(),
                reason: format!("{method} {path}: reading the reply: {err}"),
            })?;
        if !status.is_success() {
            let message = serde_json::from_str::<ApiError>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(AgentError::Refused {
                agent: self.base.clone(),
                status: status.as_u16(),
                message: format!("{method} {path}: {message}"),
            });
        }
        Ok((status.as_u16(), text))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, AgentError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn health(&self) -> Result<Health, AgentError> {
        self.get("/v1/health").await
    }

    pub async fn status(&self) -> Result<SiteStatus, AgentError> {
        self.get("/v1/status").await
    }

    /// `GET /metrics`: the OpenMetrics text Prometheus scrapes.
    pub async fn metrics(&self) -> Result<String, AgentError> {
        self.call_text(Method::GET, "/metrics", None::<&()>, CALL_TIMEOUT)
            .await
            .map(|(_, text)| text)
    }

    pub async fn apply_datapath(
        &self,
        request: &DatapathRequest,
    ) -> Result<DatapathStatus, AgentError> {
        self.call(Method::PUT, "/v1/datapath", Some(request)).await
    }

    /// Every service of the datapath, each with its own counters.
    pub async fn services(&self) -> Result<super::api::ServiceList, AgentError> {
        self.get("/v1/services").await
    }

    /// Adds the service `request.home_addr`, or rewrites it; the others are untouched.
    pub async fn put_service(
        &self,
        request: &DatapathRequest,
    ) -> Result<DatapathStatus, AgentError> {
        self.call(
            Method::PUT,
            &format!("/v1/services/{}", request.home_addr),
            Some(request),
        )
        .await
    }

    /// Removes the service `home` (fine if absent); the datapath stays attached.
    pub async fn delete_service(&self, home: std::net::IpAddr) -> Result<(), AgentError> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/v1/services/{home}"), None::<&()>)
            .await
            .map(drop)
    }

    pub async fn detach_datapath(&self) -> Result<(), AgentError> {
        self.call::<serde_json::Value>(Method::DELETE, "/v1/datapath", None::<&()>)
            .await
            .map(drop)
    }

    pub async fn set_mode(&self, mode: Mode) -> Result<DatapathStatus, AgentError> {
        self.call(
            Method::PUT,
            "/v1/datapath/mode",
            Some(&ModeRequest { mode, home: None }),
        )
        .await
    }

    /// The flow map as a snapshot (refused, as a reply, if of another version).
    pub async fn flows(&self) -> Result<FlowSnapshot, AgentError> {
        self.get("/v1/datapath/flows").await
    }

    pub async fn load_flows(&self, snapshot: &FlowSnapshot) -> Result<(), AgentError> {
        self.call::<serde_json::Value>(Method::POST, "/v1/datapath/flows", Some(snapshot))
            .await
            .map(drop)
    }

    pub async fn release_vm_iface(&self) -> Result<(), AgentError> {
        self.call::<serde_json::Value>(Method::POST, "/v1/datapath/release-vm-iface", None::<&()>)
            .await
            .map(drop)
    }

    /// Gratuitous ARP for `address` from the site's uplink.
    pub async fn garp(&self, address: std::net::IpAddr) -> Result<(), AgentError> {
        let std::net::IpAddr::V4(address) = address else {
            // IPv6 neighbours learn from the VM's own unsolicited advertisements.
            return Ok(());
        };
        self.call::<serde_json::Value>(Method::POST, "/v1/garp", Some(&GarpRequest { address }))
            .await
            .map(drop)
    }

    pub async fn ensure_tap(&self, name: &str, request: &TapRequest) -> Result<(), AgentError> {
        self.call::<serde_json::Value>(Method::PUT, &format!("/v1/taps/{name}"), Some(request))
            .await
            .map(drop)
    }

    pub async fn delete_tap(&self, name: &str) -> Result<(), AgentError> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/v1/taps/{name}"), None::<&()>)
            .await
            .map(drop)
    }

    pub async fn start_vm(&self, request: &VmRequest) -> Result<VmStatus, AgentError> {
        self.call(Method::POST, "/v1/vms", Some(request)).await
    }

    pub async fn vm(&self, name: &str) -> Result<VmStatus, AgentError> {
        self.get(&format!("/v1/vms/{name}")).await
    }

    pub async fn stop_vm(&self, name: &str) -> Result<(), AgentError> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/v1/vms/{name}"), None::<&()>)
            .await
            .map(drop)
    }

    pub async fn announce(&self, name: &str) -> Result<(), AgentError> {
        self.call::<serde_json::Value>(
            Method::POST,
            &format!("/v1/vms/{name}/announce"),
            None::<&()>,
        )
        .await
        .map(drop)
    }

    /// QEMU's side of a VM's migration (progress), as the VM's QEMU reports it.
    pub async fn migration(&self, name: &str) -> Result<MigrationState, AgentError> {
        self.get(&format!("/v1/vms/{name}/migration")).await
    }

    /// Creates the migration at its source (the same id again: the one there is).
    pub async fn create_migration(
        &self,
        spec: &MigrationSpec,
    ) -> Result<MigrationRecord, AgentError> {
        self.call(Method::POST, "/v1/migrations", Some(spec)).await
    }

    pub async fn migrations(&self) -> Result<Vec<MigrationRecord>, AgentError> {
        self.get("/v1/migrations").await
    }

    pub async fn migration_record(&self, id: &MigrationId) -> Result<MigrationRecord, AgentError> {
        self.get(&format!("/v1/migrations/{id}")).await
    }

    /// The record once its stage is not `from` any more, or after `wait` as it is.
    pub async fn migration_record_changed(
        &self,
        id: &MigrationId,
        from: Stage,
        wait: Duration,
    ) -> Result<MigrationRecord, AgentError> {
        let wait_ms = wait.as_millis() as u64;
        self.call_with_timeout(
            Method::GET,
            &format!(
                "/v1/migrations/{id}?changed_from={}&wait_ms={wait_ms}",
                from.name()
            ),
            None::<&()>,
            CALL_TIMEOUT + wait,
        )
        .await
    }

    /// The source's agent makes the destination's half.
    pub async fn create_incoming(
        &self,
        half: &IncomingHalf,
    ) -> Result<MigrationRecord, AgentError> {
        self.call(
            Method::POST,
            &format!("/v1/migrations/{}/incoming", half.spec.id),
            Some(half),
        )
        .await
    }

    pub async fn abort_migration(&self, id: &MigrationId) -> Result<MigrationRecord, AgentError> {
        self.call(
            Method::POST,
            &format!("/v1/migrations/{id}/abort"),
            None::<&()>,
        )
        .await
    }

    /// Caps the source's migration `id` at `bytes_per_second` from now on.
    pub async fn set_bandwidth(
        &self,
        id: &MigrationId,
        bytes_per_second: u64,
    ) -> Result<MigrationRecord, AgentError> {
        self.call(
            Method::PUT,
            &format!("/v1/migrations/{id}/bandwidth"),
            Some(&super::api::BandwidthRequest { bytes_per_second }),
        )
        .await
    }

    pub async fn end_tunnel(&self, id: &MigrationId) -> Result<MigrationRecord, AgentError> {
        self.call(
            Method::POST,
            &format!("/v1/migrations/{id}/tunnel-over"),
            None::<&()>,
        )
        .await
    }

    /// What ended migrations left here (a dry run).
    pub async fn leftovers(&self) -> Result<Leftovers, AgentError> {
        self.get("/v1/leftovers").await
    }

    /// Removes the leftovers; returns what was removed.
    pub async fn remove_leftovers(&self) -> Result<Leftovers, AgentError> {
        self.call(Method::DELETE, "/v1/leftovers", None::<&()>)
            .await
    }

    pub async fn dns_done(
        &self,
        id: &MigrationId,
        done: &DnsDone,
    ) -> Result<MigrationRecord, AgentError> {
        self.call(
            Method::POST,
            &format!("/v1/migrations/{id}/dns"),
            Some(done),
        )
        .await
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn unreachable() -> AgentError {
        AgentError::Unreachable {
            agent: "http://203.0.113.1:7878".into(),
            reason: "refused".into(),
        }
    }

    #[tokio::test]
    async fn unreachable_agents_are_retried_until_they_answer_or_the_limit() {
        let calls = AtomicUsize::new(0);
        let answer = retry_unreachable(Duration::from_secs(30), || async {
            match calls.fetch_add(1, Ordering::Relaxed) {
                0..3 => Err(unreachable()),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(answer.ok(), Some(7));
        assert_eq!(calls.load(Ordering::Relaxed), 4);

        let started = tokio::time::Instant::now();
        let never = retry_unreachable(Duration::from_secs(1), || async {
            Err::<(), _>(unreachable())
        })
        .await;
        let err = never.expect_err("given up").to_string();
        assert!(err.contains("retried for 1s"), "{err}");
        assert!(started.elapsed() <= Duration::from_secs(1));

        // What an agent answers is final: no retry.
        let calls = AtomicUsize::new(0);
        let refused = retry_unreachable(Duration::from_secs(30), || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>(AgentError::Refused {
                agent: "a".into(),
                status: 409,
                message: "no".into(),
            })
        })
        .await;
        assert!(matches!(
            refused,
            Err(AgentError::Refused { status: 409, .. })
        ));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }
}
