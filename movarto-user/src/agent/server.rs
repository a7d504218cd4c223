//! The agent's HTTP+JSON server (axum), with bearer-token auth and optional TLS.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    extract::{Path, Query, Request, State},
    http::{
        StatusCode,
        header::{AUTHORIZATION, CONTENT_TYPE},
    },
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use serde_json::json;
use utoipa::{
    Modify, OpenApi,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    api::{
        ApiError, BandwidthRequest, DatapathRequest, DatapathStatus, DnsDone, FlowSnapshot,
        GarpRequest, Health, IncomingHalf, Loaded, MigrationId, MigrationRecord, MigrationSpec,
        MigrationState, ModeRequest, RecordWait, ServiceList, SiteStatus, SnapshotError,
        TapRequest, VmRequest, VmStatus,
    },
    migrations::{
        MigrationError, Migrations,
        leftovers::{self, Leftovers},
    },
    site::SiteDatapath,
    tap,
    token::Token,
    vms::{VmError, Vms},
};

pub struct AgentConfig {
    pub site: String,
    pub listen: SocketAddr,
    pub token: Token,
    pub uplink: String,
    pub pin_name: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub sweep_interval: Duration,
    pub established_idle: Duration,
    /// The flow map's capacity when the agent attaches its datapath.
    pub flows_capacity: Option<u32>,
    /// Attach the datapath with the programs' debug logs on.
    pub debug_log: bool,
    /// Where VM records and QEMU logs live, for adoption after a restart.
    pub state_dir: PathBuf,
    /// Stop the VMs when the agent exits (by default they keep running).
    pub stop_vms_on_exit: bool,
    /// Serve `GET /metrics` without the token (by default it needs it, as the API does).
    pub metrics_without_token: bool,
}

/// What the handlers and the migrations' drivers share.
pub(crate) struct Agent {
    pub(crate) site: String,
    token: Token,
    pub(crate) datapath: SiteDatapath,
    pub(crate) vms: Vms,
    pub(crate) migrations: Migrations,
    metrics_without_token: bool,
}

/// An error reply: the status, and the whole context chain as the message.
struct Failure(StatusCode, anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(err: E) -> Self {
        let err = err.into();
        let status = match (
            err.downcast_ref::<VmError>(),
            err.downcast_ref::<MigrationError>(),
        ) {
            (Some(VmError::NotFound(_)), _) | (_, Some(MigrationError::NotFound(_))) => {
                StatusCode::NOT_FOUND
            }
            (Some(VmError::Conflict(_)), _) | (_, Some(MigrationError::Conflict(_))) => {
                StatusCode::CONFLICT
            }
            (_, Some(MigrationError::BadRequest(_))) => StatusCode::BAD_REQUEST,
            _ if err.is::<SnapshotError>() => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
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
            config.flows_capacity,
        )
        .with_debug_log(config.debug_log),
        vms: Vms::new(config.state_dir.clone())?,
        migrations: Migrations::new(&config.state_dir)?,
        metrics_without_token: config.metrics_without_token,
    });
    match agent.vms.adopt_all().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(vms = n, "adopted running VMs"),
        Err(err) => tracing::warn!("adopting VMs: {err:#}"),
    }
    if agent.vms.unadopted().await > 0 {
        // A QEMU that did not answer may later: try again until none is left.
        let agent = agent.clone();
        tokio::spawn(async move {
            while agent.vms.unadopted().await > 0 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if let Err(err) = agent.vms.adopt_all().await {
                    tracing::warn!("adopting VMs: {err:#}");
                }
            }
        });
    }
    match agent.datapath.status(None) {
        Ok(Some(status)) => tracing::info!(
            pin_dir = %status.pin_dir, mode = %status.mode, flows = status.flows,
            "adopted the pinned datapath"
        ),
        Ok(None) => tracing::info!(uplink = %config.uplink, "no datapath attached yet"),
        Err(err) => tracing::warn!("the pinned datapath is unreadable: {err:#}"),
    }
    match Migrations::resume_all(&agent).await {
        0 => {}
        n => tracing::info!(migrations = n, "resumed unfinished migrations"),
    }
    // What ended migrations left behind: listed first, then removed.
    match leftovers::find(&agent).await {
        Ok(found) if found.is_empty() => {}
        Ok(found) => {
            tracing::info!(?found, "leftovers of ended migrations; removing them");
            if let Err(err) = leftovers::remove(&agent).await {
                tracing::warn!("removing leftovers: {err:#}");
            }
        }
        Err(err) => tracing::warn!("looking for leftovers: {err:#}"),
    }
    let sweeper = tokio::spawn(sweep_forever(agent.clone(), config.sweep_interval));
    let app = router(agent.clone());
    // Installed now, before the agent says it serves (and systemd may stop it): a
    // signal handler made lazily inside the future would leave SIGTERM fatal until the
    // future is first polled.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
        notify_systemd(sd_notify::NotifyState::Stopping);
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
            let listening = handle.clone();
            tokio::spawn(async move {
                // Ready only once the socket is bound (axum-server binds inside serve).
                if listening.listening().await.is_some() {
                    notify_systemd(sd_notify::NotifyState::Ready);
                }
            });
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
            notify_systemd(sd_notify::NotifyState::Ready);
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

/// Tells systemd (Type=notify) where the agent is; nothing without `NOTIFY_SOCKET`.
fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(err) = sd_notify::notify(&[state]) {
        tracing::warn!("telling systemd: {err}");
    }
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

type Routes = OpenApiRouter<Arc<Agent>>;

/// The agent's routes, with their OpenAPI description: one table for both, so the
/// router and `docs/agent-api.openapi.json` can't disagree. `(public, protected,
/// metrics)`: the metrics go with one or the other, by the agent's option.
fn routes() -> (Routes, Routes, Routes) {
    let public = OpenApiRouter::with_openapi(ApiDoc::openapi()).routes(routes!(health));
    let protected = OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(apply_datapath, detach_datapath, datapath))
        .routes(routes!(set_mode))
        .routes(routes!(flows, load_flows))
        .routes(routes!(release_vm_iface))
        .routes(routes!(services))
        .routes(routes!(put_service, delete_service))
        .routes(routes!(garp))
        .routes(routes!(ensure_tap, delete_tap))
        .routes(routes!(start_vm))
        .routes(routes!(vm, stop_vm))
        .routes(routes!(announce))
        .routes(routes!(migration))
        .routes(routes!(create_migration, migrations))
        .routes(routes!(migration_record))
        .routes(routes!(create_incoming))
        .routes(routes!(abort_migration))
        .routes(routes!(set_bandwidth))
        .routes(routes!(end_tunnel))
        .routes(routes!(dns_done))
        .routes(routes!(find_leftovers, remove_leftovers));
    let metrics = OpenApiRouter::new().routes(routes!(metrics));
    (public, protected, metrics)
}

/// The agent API's OpenAPI description (`docs/agent-api.openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (public, protected, metrics) = routes();
    let (_, mut description) = public.split_for_parts();
    let (_, protected) = protected.split_for_parts();
    let (_, metrics) = metrics.split_for_parts();
    description.merge(protected);
    description.merge(metrics);
    description
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "movarto agent API",
        version = "1",
        description = "The per-site agent's control API, which `movarto-user migrate` drives. \
            Every path but /v1/health needs `Authorization: Bearer <site token>`; \
            /metrics needs it unless the agent runs with `--metrics-without-token`."
    ),
    modifiers(&SiteToken),
    security(("site_token" = []))
)]
struct ApiDoc;

/// The bearer scheme every protected path needs.
struct SiteToken;

impl Modify for SiteToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "site_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

fn router(agent: Arc<Agent>) -> Router {
    let (public, protected, metrics) = routes();
    let (mut public, _) = public.split_for_parts();
    let (mut protected, _) = protected.split_for_parts();
    let (metrics, _) = metrics.split_for_parts();
    if agent.metrics_without_token {
        public = public.merge(metrics);
    } else {
        protected = protected.merge(metrics);
    }
    let protected =
        protected.route_layer(middleware::from_fn_with_state(agent.clone(), require_token));
    public.merge(protected).with_state(agent)
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

#[utoipa::path(
    get,
    path = "/v1/health",
    tag = "agent",
    security(()),
    responses((status = 200, description = "the agent answers (no token needed)", body = Health)),
)]
async fn health(State(agent): State<Arc<Agent>>) -> Json<Health> {
    Json(Health {
        site: agent.site.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "agent",
    responses(
        (status = 200, description = "the site: datapath and VMs", body = SiteStatus),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn status(State(agent): State<Arc<Agent>>) -> Reply<SiteStatus> {
    Ok(Json(SiteStatus {
        site: agent.site.clone(),
        uplink: agent.datapath.uplink.clone(),
        datapath: agent.datapath.status(None)?,
        vms: agent.vms.all().await,
    }))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "agent",
    responses(
        (status = 200, description = "Prometheus' scrape: the datapath's counters by uplink and service, the flows, the tunnel, each migration's stage, progress, bandwidth and downtime (docs/operations.md)",
         body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn metrics(State(agent): State<Arc<Agent>>) -> Result<Response, Failure> {
    // The status walks the flow map: off the async threads.
    let reader = agent.clone();
    let datapath = blocking(move || reader.datapath.status(None)).await?;
    let migrations = agent.migrations.all().await;
    let body = super::metrics::render(&super::metrics::Scrape {
        site: &agent.site,
        uplink: &agent.datapath.uplink,
        datapath: datapath.as_ref(),
        migrations: &migrations,
    })?;
    Ok(([(CONTENT_TYPE, super::metrics::CONTENT_TYPE)], body).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/datapath",
    tag = "agent",
    responses(
        (status = 200, description = "the datapath; 404 when none is attached", body = DatapathStatus),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn datapath(State(agent): State<Arc<Agent>>) -> Reply<DatapathStatus> {
    agent.datapath.status(None)?.map(Json).ok_or_else(|| {
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

#[utoipa::path(
    put,
    path = "/v1/datapath",
    tag = "agent",
    request_body = DatapathRequest,
    responses(
        (status = 200, description = "attached, or reconfigured (the flows stay)", body = DatapathStatus),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn apply_datapath(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<DatapathRequest>,
) -> Reply<DatapathStatus> {
    Ok(Json(
        blocking(move || agent.datapath.apply(&request)).await?,
    ))
}

#[utoipa::path(
    delete,
    path = "/v1/datapath",
    tag = "agent",
    responses(
        (status = 200, description = "detached (fine if it was not attached); `{}`"),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn detach_datapath(State(agent): State<Arc<Agent>>) -> Reply<serde_json::Value> {
    blocking(move || agent.datapath.detach(None)).await?;
    Ok(empty())
}

#[utoipa::path(
    put,
    path = "/v1/datapath/mode",
    tag = "agent",
    request_body = ModeRequest,
    responses(
        (status = 200, description = "the mode is set (one map write)", body = DatapathStatus),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn set_mode(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<ModeRequest>,
) -> Reply<DatapathStatus> {
    Ok(Json(
        blocking(move || agent.datapath.set_mode(request.home, request.mode)).await?,
    ))
}

#[utoipa::path(
    get,
    path = "/v1/datapath/flows",
    tag = "agent",
    responses(
        (status = 200, description = "the flow map as a snapshot (docs/flow-snapshot.md)", body = FlowSnapshot),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn flows(State(agent): State<Arc<Agent>>) -> Reply<FlowSnapshot> {
    Ok(Json(agent.datapath.flows(None)?))
}

#[utoipa::path(
    post,
    path = "/v1/datapath/flows",
    tag = "agent",
    request_body = FlowSnapshot,
    responses(
        (status = 200, description = "the other site's snapshot is loaded as tunnelled flows; 400 for a version this agent does not read", body = Loaded),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
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

#[utoipa::path(
    post,
    path = "/v1/datapath/release-vm-iface",
    tag = "agent",
    responses(
        (status = 200, description = "the VM-facing hook is released; `{}`"),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn release_vm_iface(State(agent): State<Arc<Agent>>) -> Reply<serde_json::Value> {
    agent.datapath.release_vm_iface(None)?;
    Ok(empty())
}

#[utoipa::path(
    post,
    path = "/v1/garp",
    tag = "agent",
    request_body = GarpRequest,
    responses(
        (status = 200, description = "three gratuitous ARPs sent on the uplink; `{}`"),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
/// Three announcements, as `arping -U -c 3` would send.
async fn garp(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<GarpRequest>,
) -> Reply<serde_json::Value> {
    super::garp::send(&agent.datapath.uplink, request.address, 3)?;
    Ok(empty())
}

#[utoipa::path(
    put,
    path = "/v1/taps/{name}",
    tag = "agent",
    params(("name" = String, Path, description = "the VM's or the tap's name")),
    request_body = TapRequest,
    responses(
        (status = 200, description = "the tap exists with the gateway on it; `{}`"),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn ensure_tap(
    Path(name): Path<String>,
    Json(request): Json<TapRequest>,
) -> Reply<serde_json::Value> {
    let mac = request.gateway_mac.0;
    let (ip, prefix) = tap::parse_cidr(&request.gateway_cidr)?;
    tap::ensure_tap(&name, mac, ip, prefix).await?;
    Ok(empty())
}

#[utoipa::path(
    get,
    path = "/v1/services",
    tag = "agent",
    responses(
        (status = 200, description = "every service of the node's datapath, with its own counters", body = ServiceList),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn services(State(agent): State<Arc<Agent>>) -> Reply<ServiceList> {
    Ok(Json(blocking(move || agent.datapath.services()).await?))
}

#[utoipa::path(
    put,
    path = "/v1/services/{home}",
    tag = "agent",
    params(("home" = String, Path, description = "the service's home address H")),
    request_body = DatapathRequest,
    responses(
        (status = 200, description = "the service is added, or rewritten whole (its flows and counters stay); the node's other services are untouched", body = DatapathStatus),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn put_service(
    State(agent): State<Arc<Agent>>,
    Path(home): Path<IpAddr>,
    Json(request): Json<DatapathRequest>,
) -> Reply<DatapathStatus> {
    if request.home_addr != home {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            anyhow::anyhow!(
                "the path names service {home}, the body {}",
                request.home_addr
            ),
        ));
    }
    Ok(Json(
        blocking(move || agent.datapath.apply(&request)).await?,
    ))
}

#[utoipa::path(
    delete,
    path = "/v1/services/{home}",
    tag = "agent",
    params(("home" = String, Path, description = "the service's home address H")),
    responses(
        (status = 200, description = "the service is gone (fine if it was not there), the datapath stays attached; `{}`"),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn delete_service(
    State(agent): State<Arc<Agent>>,
    Path(home): Path<IpAddr>,
) -> Reply<serde_json::Value> {
    blocking(move || agent.datapath.remove_service(home)).await?;
    Ok(empty())
}

#[utoipa::path(
    delete,
    path = "/v1/taps/{name}",
    tag = "agent",
    params(("name" = String, Path, description = "the VM's or the tap's name")),
    responses(
        (status = 200, description = "the tap is gone; `{}`"),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn delete_tap(Path(name): Path<String>) -> Reply<serde_json::Value> {
    tap::delete_tap(&name).await?;
    Ok(empty())
}

#[utoipa::path(
    post,
    path = "/v1/vms",
    tag = "agent",
    request_body = VmRequest,
    responses(
        (status = 200, description = "the VM runs (the same spec again: no-op)", body = VmStatus),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn start_vm(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<VmRequest>,
) -> Reply<VmStatus> {
    Ok(Json(agent.vms.start(&request).await?))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}",
    tag = "agent",
    params(("name" = String, Path, description = "the VM's or the tap's name")),
    responses(
        (status = 200, description = "the VM", body = VmStatus),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn vm(State(agent): State<Arc<Agent>>, Path(name): Path<String>) -> Reply<VmStatus> {
    Ok(Json(agent.vms.status(&name).await?))
}

#[utoipa::path(
    delete,
    path = "/v1/vms/{name}",
    tag = "agent",
    params(("name" = String, Path, description = "the VM's or the tap's name")),
    responses(
        (status = 200, description = "the VM is stopped; `{}`"),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn stop_vm(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Reply<serde_json::Value> {
    agent.vms.stop(&name).await?;
    Ok(empty())
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/announce",
    tag = "agent",
    params(("name" = String, Path, description = "the VM's or the tap's name")),
    responses(
        (status = 200, description = "announce-self sent; `{}`"),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn announce(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Reply<serde_json::Value> {
    agent.vms.announce(&name).await?;
    Ok(empty())
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/migration",
    tag = "agent",
    params(("name" = String, Path, description = "the VM's or the tap's name")),
    responses(
        (status = 200, description = "the migration's state", body = MigrationState),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn migration(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Reply<MigrationState> {
    Ok(Json(agent.vms.migration(&name).await?))
}

/// A record as the API shows it: the peers' tokens blanked.
fn shown(mut record: MigrationRecord) -> Json<MigrationRecord> {
    record.spec.source_agent.token.clear();
    record.spec.destination_agent.token.clear();
    Json(record)
}

fn migration_id(id: &str) -> Result<MigrationId, Failure> {
    MigrationId::new(id).map_err(|why| Failure(StatusCode::BAD_REQUEST, anyhow::anyhow!(why)))
}

#[utoipa::path(
    post,
    path = "/v1/migrations",
    tag = "migrations",
    request_body = MigrationSpec,
    responses(
        (status = 200, description = "the migration, created at its source and driven by this agent (the same id again: the one there is)", body = MigrationRecord),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn create_migration(
    State(agent): State<Arc<Agent>>,
    Json(spec): Json<MigrationSpec>,
) -> Reply<MigrationRecord> {
    Ok(shown(Migrations::create_outgoing(&agent, spec).await?))
}

#[utoipa::path(
    get,
    path = "/v1/migrations",
    tag = "migrations",
    responses(
        (status = 200, description = "every migration this agent holds, oldest first", body = Vec<MigrationRecord>),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn migrations(State(agent): State<Arc<Agent>>) -> Reply<Vec<MigrationRecord>> {
    let all = agent.migrations.all().await;
    Ok(Json(all.into_iter().map(|r| shown(r).0).collect()))
}

#[utoipa::path(
    get,
    path = "/v1/migrations/{id}",
    tag = "migrations",
    params(("id" = String, Path, description = "the migration's id"), RecordWait),
    responses(
        (status = 200, description = "the migration (with `changed_from`: once it has left that stage, or when `wait_ms` ran out)", body = MigrationRecord),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn migration_record(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(wait): Query<RecordWait>,
) -> Reply<MigrationRecord> {
    let id = migration_id(&id)?;
    let migration = agent.migrations.get(&id).await?;
    if let Some(from) = wait.changed_from {
        let limit = wait.wait_ms.unwrap_or(0).min(RecordWait::LONGEST_MS);
        migration
            .wait_stage_change(from, Duration::from_millis(limit))
            .await;
    }
    Ok(shown(migration.snapshot()))
}

#[utoipa::path(
    post,
    path = "/v1/migrations/{id}/incoming",
    tag = "migrations",
    params(("id" = String, Path, description = "the migration's id")),
    request_body = IncomingHalf,
    responses(
        (status = 200, description = "the destination's half, which this agent prepares and drives", body = MigrationRecord),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn create_incoming(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Json(half): Json<IncomingHalf>,
) -> Reply<MigrationRecord> {
    if migration_id(&id)? != half.spec.id {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            anyhow::anyhow!("the path names {id}, the body {}", half.spec.id),
        ));
    }
    Ok(shown(Migrations::create_incoming(&agent, half).await?))
}

#[utoipa::path(
    post,
    path = "/v1/migrations/{id}/abort",
    tag = "migrations",
    params(("id" = String, Path, description = "the migration's id")),
    responses(
        (status = 200, description = "source: the rollback is asked for (409 past the switchover); destination: it cleans up once the source runs the VM again", body = MigrationRecord),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn abort_migration(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Reply<MigrationRecord> {
    let id = migration_id(&id)?;
    Ok(shown(agent.migrations.abort(&id).await?))
}

#[utoipa::path(
    put,
    path = "/v1/migrations/{id}/bandwidth",
    tag = "migrations",
    params(("id" = String, Path, description = "the migration's id")),
    request_body = BandwidthRequest,
    responses(
        (status = 200, description = "source: QEMU's migration is capped at this from now on (409 once it is over)", body = MigrationRecord),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn set_bandwidth(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Json(request): Json<BandwidthRequest>,
) -> Reply<MigrationRecord> {
    let id = migration_id(&id)?;
    Ok(shown(
        Migrations::set_bandwidth(&agent, &id, request.bytes_per_second).await?,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/migrations/{id}/tunnel-over",
    tag = "migrations",
    params(("id" = String, Path, description = "the migration's id")),
    responses(
        (status = 200, description = "destination: the drain is over; the datapath is in nat (or detached)", body = MigrationRecord),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn end_tunnel(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Reply<MigrationRecord> {
    let id = migration_id(&id)?;
    Ok(shown(Migrations::tunnel_over(&agent, &id).await?))
}

#[utoipa::path(
    post,
    path = "/v1/migrations/{id}/dns",
    tag = "migrations",
    params(("id" = String, Path, description = "the migration's id")),
    request_body = DnsDone,
    responses(
        (status = 200, description = "the DNS work the orchestrator did is recorded", body = MigrationRecord),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn dns_done(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Json(done): Json<DnsDone>,
) -> Reply<MigrationRecord> {
    let id = migration_id(&id)?;
    Ok(shown(agent.migrations.dns_done(&id, done).await?))
}

#[utoipa::path(
    get,
    path = "/v1/leftovers",
    tag = "migrations",
    responses(
        (status = 200, description = "the dry run: what ended migrations left that nothing needs (QEMUs, taps, a datapath in a tunnel mode)", body = Leftovers),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn find_leftovers(State(agent): State<Arc<Agent>>) -> Reply<Leftovers> {
    Ok(Json(leftovers::find(&agent).await?))
}

#[utoipa::path(
    delete,
    path = "/v1/leftovers",
    tag = "migrations",
    responses(
        (status = 200, description = "removed; what was removed", body = Leftovers),
        (status = "default", description = "an error, with its whole context chain", body = ApiError),
    ),
)]
async fn remove_leftovers(State(agent): State<Arc<Agent>>) -> Reply<Leftovers> {
    Ok(Json(leftovers::remove(&agent).await?))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use reqwest::{Method, StatusCode as Status};

    use super::*;

    const DESCRIPTION: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/agent-api.openapi.json"
    );

    /// The checked-in description is the one the code generates; `MOVARTO_BLESS=1`
    /// rewrites it.
    #[test]
    fn the_checked_in_description_is_current() {
        let generated = openapi().to_pretty_json().expect("json") + "\n";
        if std::env::var_os("MOVARTO_BLESS").is_some() {
            std::fs::write(DESCRIPTION, &generated).expect("writing the description");
            return;
        }
        let checked_in = std::fs::read_to_string(DESCRIPTION).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/agent-api.openapi.json is out of date with agent/server.rs and agent/api.rs; \
             regenerate it with `MOVARTO_BLESS=1 cargo test -p movarto-user --lib \
             the_checked_in_description_is_current` and commit it"
        );
    }

    /// An agent on `lo` with a pin name no datapath has.
    fn test_agent(state_dir: &Path, metrics_without_token: bool) -> Arc<Agent> {
        Arc::new(Agent {
            site: "test".to_owned(),
            token: Token::new("a-token-for-the-route-test").expect("token"),
            datapath: SiteDatapath::new(
                "lo".to_owned(),
                Some(format!("mvt-route-test-{}", std::process::id())),
                Duration::from_secs(1),
                None,
            ),
            vms: Vms::new(state_dir.to_owned()).expect("state dir"),
            migrations: Migrations::new(state_dir).expect("journal"),
            metrics_without_token,
        })
    }

    /// `/metrics` needs the token by default; `--metrics-without-token` serves it to
    /// anyone (and only it: the API still needs the token).
    #[tokio::test]
    async fn metrics_need_the_token_unless_the_agent_is_told_otherwise() {
        for (without_token, expected) in [(false, Status::UNAUTHORIZED), (true, Status::OK)] {
            let state_dir = std::env::temp_dir().join(format!(
                "movarto-metrics-{}-{without_token}",
                std::process::id()
            ));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("listen");
            let addr = listener.local_addr().expect("addr");
            let app = router(test_agent(&state_dir, without_token));
            let server = tokio::spawn(axum::serve(listener, app).into_future());
            let http = reqwest::Client::new();
            let anonymous = http
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .expect("request");
            assert_eq!(
                anonymous.status(),
                expected,
                "without_token={without_token}"
            );
            let with_token = http
                .get(format!("http://{addr}/metrics"))
                .bearer_auth("a-token-for-the-route-test")
                .send()
                .await
                .expect("request");
            assert_eq!(with_token.status(), Status::OK);
            assert!(
                with_token
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/openmetrics-text"))
            );
            let body = with_token.text().await.expect("body");
            assert!(body.contains(r#"movarto_agent{site="test""#), "{body}");
            assert!(body.ends_with("# EOF\n"), "{body}");
            let status = http
                .get(format!("http://{addr}/v1/status"))
                .send()
                .await
                .expect("request");
            assert_eq!(status.status(), Status::UNAUTHORIZED);
            server.abort();
            let _ = std::fs::remove_dir_all(&state_dir);
        }
    }

    /// Every described path is routed (without a token the check answers 401, where an
    /// unrouted path is 404), and every other method on it is refused by the router
    /// (405 with the token, so no handler runs). The router and the description are
    /// built from one table ([`routes`]); this checks that table's result.
    #[tokio::test]
    async fn the_router_serves_exactly_the_described_paths_and_methods() {
        let state_dir =
            std::env::temp_dir().join(format!("movarto-openapi-{}", std::process::id()));
        let agent = test_agent(&state_dir, false);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(axum::serve(listener, router(agent)).into_future());
        let http = reqwest::Client::new();
        let methods = [Method::GET, Method::PUT, Method::POST, Method::DELETE];
        let description = openapi();
        assert!(description.paths.paths.len() > 10);
        for (path, item) in &description.paths.paths {
            let url = format!(
                "http://{addr}{}",
                path.replace("{name}", "web").replace("{id}", "web-1")
            );
            let described = [
                (Method::GET, item.get.is_some()),
                (Method::PUT, item.put.is_some()),
                (Method::POST, item.post.is_some()),
                (Method::DELETE, item.delete.is_some()),
            ];
            for method in methods.iter().cloned() {
                let is_described = described.iter().any(|(m, yes)| *m == method && *yes);
                let mut request = http.request(method.clone(), &url);
                if !is_described {
                    request = request.bearer_auth("a-token-for-the-route-test");
                }
                let status = request.send().await.expect("request").status();
                let expected = match (is_described, path.as_str()) {
                    (true, "/v1/health") => Status::OK,
                    (true, _) => Status::UNAUTHORIZED,
                    (false, _) => Status::METHOD_NOT_ALLOWED,
                };
                assert_eq!(status, expected, "{method} {path}");
            }
        }
        let unknown = http
            .get(format!("http://{addr}/v1/nothing-here"))
            .send()
            .await
            .expect("request");
        assert_eq!(unknown.status(), Status::NOT_FOUND);
        server.abort();
        let _ = std::fs::remove_dir_all(Path::new(&state_dir));
    }
}
