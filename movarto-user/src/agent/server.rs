//! The agent's HTTP+JSON server (axum), with bearer-token auth and optional TLS.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    extract::{Path, Request, State},
    http::{StatusCode, header::AUTHORIZATION},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde_json::json;

use super::{
    api::{
        ApiError, ContinueRequest, DatapathRequest, DatapathStatus, FlowSnapshot, GarpRequest,
        Health, IncomingRequest, Loaded, MigrationState, MirrorSettings, ModeRequest,
        OutgoingRequest, SiteStatus, SnapshotError, TapRequest, VmRequest, VmStatus,
    },
    site::SiteDatapath,
    tap,
    token::Token,
    vms::{VmError, Vms},
};
use crate::qemu::mirror::MirrorReady;

pub struct AgentConfig {
    pub site: String,
    pub listen: SocketAddr,
    pub token: Token,
    pub uplink: String,
    pub pin_name: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub sweep_interval: Duration,
    pub established_idle: Duration,
    /// Where VM records and QEMU logs live, for adoption after a restart.
    pub state_dir: PathBuf,
    /// Stop the VMs when the agent exits (by default they keep running).
    pub stop_vms_on_exit: bool,
}

struct Agent {
    site: String,
    token: Token,
    datapath: SiteDatapath,
    vms: Vms,
}

/// An error reply: the status, and the whole context chain as the message.
struct Failure(StatusCode, anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(err: E) -> Self {
        let err = err.into();
        let status = match err.downcast_ref::<VmError>() {
            Some(VmError::NotFound(_)) => StatusCode::NOT_FOUND,
            Some(VmError::Conflict(_)) => StatusCode::CONFLICT,
            None if err.is::<SnapshotError>() => StatusCode::BAD_REQUEST,
            None => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, err)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        tracing::warn!(status = %self.0, "request failed: {:#}", self.1);
        let body = ApiError {
            error: format!("{:#}", self.1),
        };
        (self.0, Json(body)).into_response()
    }
}

type Reply<T> = Result<Json<T>, Failure>;

fn empty() -> Json<serde_json::Value> {
    Json(json!({}))
}

/// Runs until SIGINT or SIGTERM. The datapath stays attached (it is pinned), so traffic
/// keeps flowing while the agent restarts; VMs it started are stopped.
pub async fn serve(config: AgentConfig) -> Result<()> {
    let agent = Arc::new(Agent {
        site: config.site.clone(),
        token: config.token.clone(),
        datapath: SiteDatapath::new(
            config.uplink.clone(),
            config.pin_name.clone(),
            config.established_idle,
        ),
        vms: Vms::new(config.state_dir.clone())?,
    });
    match agent.vms.adopt_all().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(vms = n, "adopted running VMs"),
        Err(err) => tracing::warn!("adopting VMs: {err:#}"),
    }
    match agent.datapath.status() {
        Ok(Some(status)) => tracing::info!(
            pin_dir = %status.pin_dir, mode = %status.mode, flows = status.flows,
            "adopted the pinned datapath"
        ),
        Ok(None) => tracing::info!(uplink = %config.uplink, "no datapath attached yet"),
        Err(err) => tracing::warn!("the pinned datapath is unreadable: {err:#}"),
    }
    let sweeper = tokio::spawn(sweep_forever(agent.clone(), config.sweep_interval));
    let app = router(agent.clone());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    };
    let served = match &config.tls {
        Some((cert, key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| {
                    format!(
                        "loading the TLS certificate {} and key {}",
                        cert.display(),
                        key.display()
                    )
                })?;
            let handle = axum_server::Handle::new();
            let server = axum_server::bind_rustls(config.listen, tls)
                .handle(handle.clone())
                .serve(app.into_make_service());
            tracing::info!(listen = %config.listen, site = %config.site, "agent serving (TLS)");
            tokio::select! {
                served = server => served.context("serving"),
                stop = shutdown => { handle.graceful_shutdown(Some(Duration::from_secs(2))); stop }
            }
        }
        None => {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("listening on {}", config.listen))?;
            tracing::info!(listen = %config.listen, site = %config.site, "agent serving");
            tokio::select! {
                served = axum::serve(listener, app) => served.context("serving"),
                stop = shutdown => stop,
            }
        }
    };
    sweeper.abort();
    if config.stop_vms_on_exit {
        tracing::info!("agent stopping; the datapath stays pinned; stopping the VMs");
        agent.vms.stop_all().await;
    } else {
        tracing::info!("agent stopping; the datapath stays pinned and the VMs keep running");
    }
    served
}

async fn sweep_forever(agent: Arc<Agent>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        match agent.datapath.sweep() {
            Ok(0) => {}
            Ok(n) => tracing::info!(flows = n, "swept expired flows"),
            Err(err) => tracing::warn!("sweep: {err:#}"),
        }
    }
}

fn router(agent: Arc<Agent>) -> Router {
    let protected = Router::new()
        .route("/v1/status", get(status))
        .route(
            "/v1/datapath",
            put(apply_datapath).delete(detach_datapath).get(datapath),
        )
        .route("/v1/datapath/mode", put(set_mode))
        .route("/v1/datapath/flows", get(flows).post(load_flows))
        .route("/v1/datapath/release-vm-iface", post(release_vm_iface))
        .route("/v1/garp", post(garp))
        .route("/v1/taps/{name}", put(ensure_tap).delete(delete_tap))
        .route("/v1/vms", post(start_vm))
        .route("/v1/vms/{name}", get(vm).delete(stop_vm))
        .route("/v1/vms/{name}/incoming", post(prepare_incoming))
        .route("/v1/vms/{name}/finish-incoming", post(finish_incoming))
        .route("/v1/vms/{name}/announce", post(announce))
        .route("/v1/vms/{name}/mirror", post(start_mirror))
        .route(
            "/v1/vms/{name}/migration",
            post(start_migration).get(migration),
        )
        .route(
            "/v1/vms/{name}/migration/continue",
            post(continue_migration),
        )
        .route_layer(middleware::from_fn_with_state(agent.clone(), require_token));
    Router::new()
        .route("/v1/health", get(health))
        .merge(protected)
        .with_state(agent)
}

async fn require_token(State(agent): State<Arc<Agent>>, request: Request, next: Next) -> Response {
    let offered = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match offered {
        Some(token) if agent.token.matches(token) => next.run(request).await,
        offered => {
            tracing::warn!(
                path = %request.uri().path(),
                "refused a request {}",
                if offered.is_some() { "with a wrong token" } else { "without a token" }
            );
            let body = ApiError {
                error: "unauthorized: this agent needs `Authorization: Bearer <site token>`"
                    .to_owned(),
            };
            (StatusCode::UNAUTHORIZED, Json(body)).into_response()
        }
    }
}

async fn health(State(agent): State<Arc<Agent>>) -> Json<Health> {
    Json(Health {
        site: agent.site.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn status(State(agent): State<Arc<Agent>>) -> Reply<SiteStatus> {
    Ok(Json(SiteStatus {
        site: agent.site.clone(),
        uplink: agent.datapath.uplink.clone(),
        datapath: agent.datapath.status()?,
        vms: agent.vms.all().await,
    }))
}

async fn datapath(State(agent): State<Arc<Agent>>) -> Reply<DatapathStatus> {
    agent.datapath.status()?.map(Json).ok_or_else(|| {
        Failure(
            StatusCode::NOT_FOUND,
            anyhow::anyhow!("no datapath attached"),
        )
    })
}

/// Loading runs the verifier (tens of milliseconds): off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T, Failure> {
    Ok(tokio::task::spawn_blocking(work)
        .await
        .context("the datapath task panicked")??)
}

async fn apply_datapath(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<DatapathRequest>,
) -> Reply<DatapathStatus> {
    Ok(Json(
        blocking(move || agent.datapath.apply(&request)).await?,
    ))
}

async fn detach_datapath(State(agent): State<Arc<Agent>>) -> Reply<serde_json::Value> {
    blocking(move || agent.datapath.detach()).await?;
    Ok(empty())
}

async fn set_mode(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<ModeRequest>,
) -> Reply<DatapathStatus> {
    Ok(Json(
        blocking(move || agent.datapath.set_mode(request.mode)).await?,
    ))
}

async fn flows(State(agent): State<Arc<Agent>>) -> Reply<FlowSnapshot> {
    Ok(Json(agent.datapath.flows()?))
}

/// The body is read as JSON first, so a snapshot of another version is refused with a
/// message naming both versions (not as whatever field its format changed).
async fn load_flows(
    State(agent): State<Arc<Agent>>,
    Json(body): Json<serde_json::Value>,
) -> Reply<Loaded> {
    let snapshot = FlowSnapshot::from_json(body)?;
    Ok(Json(Loaded {
        loaded: agent.datapath.load_flows(&snapshot)?,
    }))
}

async fn release_vm_iface(State(agent): State<Arc<Agent>>) -> Reply<serde_json::Value> {
    agent.datapath.release_vm_iface()?;
    Ok(empty())
}

/// Three announcements, as `arping -U -c 3` would send.
async fn garp(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<GarpRequest>,
) -> Reply<serde_json::Value> {
    super::garp::send(&agent.datapath.uplink, request.address, 3)?;
    Ok(empty())
}

async fn ensure_tap(
    Path(name): Path<String>,
    Json(request): Json<TapRequest>,
) -> Reply<serde_json::Value> {
    let mac = request.gateway_mac.0;
    let (ip, prefix) = tap::parse_cidr(&request.gateway_cidr)?;
    tap::ensure_tap(&name, mac, ip, prefix).await?;
    Ok(empty())
}

async fn delete_tap(Path(name): Path<String>) -> Reply<serde_json::Value> {
    tap::delete_tap(&name).await?;
    Ok(empty())
}

async fn start_vm(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<VmRequest>,
) -> Reply<VmStatus> {
    Ok(Json(agent.vms.start(&request).await?))
}

async fn vm(State(agent): State<Arc<Agent>>, Path(name): Path<String>) -> Reply<VmStatus> {
    Ok(Json(agent.vms.status(&name).await?))
}

async fn stop_vm(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Reply<serde_json::Value> {
    agent.vms.stop(&name).await?;
    Ok(empty())
}

async fn prepare_incoming(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(request): Json<IncomingRequest>,
) -> Reply<serde_json::Value> {
    agent.vms.prepare_incoming(&name, &request).await?;
    Ok(empty())
}

async fn finish_incoming(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Reply<VmStatus> {
    Ok(Json(agent.vms.finish_incoming(&name).await?))
}

async fn announce(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Reply<serde_json::Value> {
    agent.vms.announce(&name).await?;
    Ok(empty())
}

async fn start_mirror(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(request): Json<MirrorSettings>,
) -> Reply<MirrorReady> {
    Ok(Json(agent.vms.start_mirror(&name, &request).await?))
}

async fn start_migration(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(request): Json<OutgoingRequest>,
) -> Reply<MigrationState> {
    Ok(Json(agent.vms.start_migration(&name, &request).await?))
}

async fn migration(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Reply<MigrationState> {
    Ok(Json(agent.vms.migration(&name).await?))
}

async fn continue_migration(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(request): Json<ContinueRequest>,
) -> Reply<MigrationState> {
    Ok(Json(
        agent.vms.continue_migration(&name, request.proceed).await?,
    ))
}
