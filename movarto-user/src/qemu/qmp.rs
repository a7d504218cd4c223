//! A small async QMP client over QEMU's unix socket.
//!
//! - [`Qmp::connect`] reads the greeting and negotiates with `qmp_capabilities`.
//! - [`Qmp::run`] sends a typed [`QmpCommand`] and waits, with a timeout, for the reply
//!   carrying the same `id`; QEMU's errors come back as [`QmpError::Command`] with its `desc`.
//! - [`Qmp::run_oob`] sends one out-of-band (`exec-oob`), when QEMU offers it: QEMU runs
//!   it in the monitor's own thread, so it is answered even while the main thread waits
//!   (a post-copy destination's main thread can wait on a page the broken stream never
//!   brings; `migrate-pause` and `migrate-recover` are made for that).
//! - Events go to every [`Qmp::subscribe`]r; [`EventStream::wait_for`] waits with a timeout.
//! - When QEMU exits or closes the socket, every pending command and every event waiter
//!   fails at once with [`QmpError::Closed`]: nothing hangs.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{
        UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{broadcast, oneshot},
    task::JoinHandle,
    time::{Instant, timeout},
};

/// How long a command waits for its reply unless told otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// QEMU answered the command with an error.
    #[error("QEMU refused `{command}`: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// The connection is gone (QEMU exited, crashed or closed the socket).
    #[error("the QMP connection is closed: {reason}")]
    Closed { reason: String },
    /// No reply or event within the time allowed.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
}

/// A QMP command with its arguments (the struct's fields) and the type of its reply.
pub trait QmpCommand: Serialize {
    const NAME: &'static str;
    type Reply: DeserializeOwned;
}

/// For commands whose reply is `{}`.
#[derive(Debug, Deserialize)]
pub struct Empty {}

/// An asynchronous message from QEMU.
#[derive(Clone, Debug, Deserialize)]
pub struct Event {
    #[serde(rename = "event")]
    pub name: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub timestamp: Timestamp,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl Timestamp {
    /// The wall-clock time QEMU stamped the event with.
    pub fn as_system_time(&self) -> std::time::SystemTime {
        let since_epoch = Duration::from_secs(self.seconds.max(0) as u64)
            + Duration::from_micros(self.microseconds.max(0) as u64);
        std::time::UNIX_EPOCH + since_epoch
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Greeting {
    #[serde(rename = "QMP")]
    pub qmp: GreetingBody,
}

#[derive(Clone, Debug, Deserialize)]
pub struct GreetingBody {
    pub version: VersionInfo,
    /// What the server offers, e.g. `oob`.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct VersionInfo {
    pub qemu: QemuVersion,
    #[serde(default)]
    pub package: String,
}

#[derive(Clone, Copy, Debug, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

type Reply = std::result::Result<Value, QmpError>;

/// In-band commands QEMU may hold unanswered, the oldest for [`INBAND_STUCK`], before
/// this client stops sending more. QEMU queues at most 8 (`QMP_REQ_QUEUE_LEN_MAX`) and
/// then stops reading the socket, out-of-band commands too: staying below keeps
/// `exec-oob` working while the main thread is stuck (on a post-copy page, say). A QEMU
/// only busy for a moment (the blackout) is not refused anything.
const INBAND_UNANSWERED_MAX: usize = 6;
const INBAND_STUCK: Duration = Duration::from_secs(1);

struct State {
    pending: HashMap<u64, (String, oneshot::Sender<Reply>)>,
    /// In-band commands sent and not answered yet, their waiters gone or not.
    inband_unanswered: HashMap<u64, Instant>,
    /// `Some(reason)` once the connection is gone.
    closed: Option<String>,
    /// Dropped on close, which ends every [`EventStream`].
    events: Option<broadcast::Sender<Event>>,
}

/// A connected, negotiated QMP session. Cheap to share behind an `Arc`.
pub struct Qmp {
    socket: PathBuf,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    state: Arc<Mutex<State>>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    greeting: Greeting,
    command_timeout: Duration,
    /// Out-of-band execution was negotiated.
    oob: bool,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects to `socket`, retrying while QEMU is still creating it, for up to `wait`.
    pub async fn connect(socket: &Path, wait: Duration) -> Result<Self> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                Err(err) if Instant::now() < deadline => {
                    tracing::trace!(%err, socket = %socket.display(), "QMP socket not ready");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!(
                            "connecting to QMP at {} (waited {wait:?})",
                            socket.display()
                        )
                    });
                }
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let remaining =
            deadline.saturating_duration_since(Instant::now()) + DEFAULT_COMMAND_TIMEOUT;
        let greeting = timeout(remaining, read_greeting(&mut lines, socket))
            .await
            .map_err(|_| QmpError::Timeout {
                what: format!("the QMP greeting on {}", socket.display()),
                after: remaining,
            })??;
        let (events, _) = broadcast::channel(1024);
        let state = Arc::new(Mutex::new(State {
            pending: HashMap::new(),
            inband_unanswered: Default::default(),
            closed: None,
            events: Some(events),
        }));
        let reader = tokio::spawn(read_loop(lines, state.clone()));
        let oob = greeting.qmp.capabilities.iter().any(|c| c == "oob");
        let qmp = Self {
            socket: socket.to_owned(),
            writer: tokio::sync::Mutex::new(write),
            state,
            next_id: AtomicU64::new(1),
            reader,
            greeting,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            oob,
        };
        qmp.run(&QmpCapabilities {
            enable: oob.then(|| vec!["oob"]),
        })
        .await
        .context("negotiating QMP capabilities")?;
        tracing::debug!(socket = %socket.display(), version = ?qmp.greeting.qmp.version.qemu, "QMP connected");
        Ok(qmp)
    }

    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Runs `command` and waits up to the default timeout for its reply.
    pub async fn run<C: QmpCommand>(&self, command: &C) -> Result<C::Reply> {
        self.run_with_timeout(command, self.command_timeout).await
    }

    pub async fn run_with_timeout<C: QmpCommand>(
        &self,
        command: &C,
        limit: Duration,
    ) -> Result<C::Reply> {
        let arguments = serde_json::to_value(command)
            .with_context(|| format!("encoding the arguments of {}", C::NAME))?;
        let value = self.execute(C::NAME, arguments, limit).await?;
        serde_json::from_value(value.clone())
            .with_context(|| format!("decoding QEMU's reply to {}: {value}", C::NAME))
    }

    /// Runs `command` out-of-band if QEMU offered it (only commands QEMU allows so), in
    /// band otherwise.
    pub async fn run_oob<C: QmpCommand>(&self, command: &C, limit: Duration) -> Result<C::Reply> {
        let arguments = serde_json::to_value(command)
            .with_context(|| format!("encoding the arguments of {}", C::NAME))?;
        let verb = if self.oob { "exec-oob" } else { "execute" };
        let value = self.send(verb, C::NAME, arguments, limit).await?;
        serde_json::from_value(value.clone())
            .with_context(|| format!("decoding QEMU's reply to {}: {value}", C::NAME))
    }

    /// Runs any command by name; `arguments` is omitted when null or `{}`.
    pub async fn execute(&self, name: &str, arguments: Value, limit: Duration) -> Result<Value> {
        self.send("execute", name, arguments, limit).await
    }

    /// `verb`: `execute`, or `exec-oob`.
    async fn send(
        &self,
        verb: &str,
        name: &str,
        arguments: Value,
        limit: Duration,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut state = lock(&self.state);
            if let Some(reason) = &state.closed {
                return Err(QmpError::Closed {
                    reason: reason.clone(),
                }
                .into());
            }
            if verb == "execute" {
                let stuck = state
                    .inband_unanswered
                    .values()
                    .min()
                    .is_some_and(|oldest| oldest.elapsed() >= INBAND_STUCK);
                if stuck && state.inband_unanswered.len() >= INBAND_UNANSWERED_MAX {
                    return Err(QmpError::Timeout {
                        what: format!(
                            "QEMU's reply to `{name}`: not sent, {} commands before it are \
                             unanswered (its main thread is busy)",
                            state.inband_unanswered.len()
                        ),
                        after: Duration::ZERO,
                    }
                    .into());
                }
                state.inband_unanswered.insert(id, Instant::now());
            }
            state.pending.insert(id, (name.to_owned(), tx));
        }
        let mut message = serde_json::json!({ verb: name, "id": id });
        let has_arguments = match &arguments {
            Value::Null => false,
            Value::Object(map) => !map.is_empty(),
            _ => true,
        };
        if has_arguments {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        tracing::trace!(%line, "QMP ->");
        let sent = {
            let mut writer = self.writer.lock().await;
            writer.write_all(line.as_bytes()).await
        };
        if let Err(err) = sent {
            let mut state = lock(&self.state);
            state.pending.remove(&id);
            state.inband_unanswered.remove(&id);
            drop(state);
            return Err(QmpError::Closed {
                reason: format!("writing `{name}` failed: {err}"),
            }
            .into());
        }
        match timeout(limit, rx).await {
            Ok(Ok(reply)) => Ok(reply?),
            // The reader dropped the sender without a reply: the connection closed.
            Ok(Err(_)) => Err(QmpError::Closed {
                reason: self.closed_reason(),
            }
            .into()),
            Err(_) => {
                lock(&self.state).pending.remove(&id);
                Err(QmpError::Timeout {
                    what: format!("QEMU's reply to `{name}`"),
                    after: limit,
                }
                .into())
            }
        }
    }

    /// A stream of the events QEMU sends from now on.
    pub fn subscribe(&self) -> Result<EventStream> {
        let state = lock(&self.state);
        match &state.events {
            Some(events) => Ok(EventStream {
                rx: events.subscribe(),
            }),
            None => Err(QmpError::Closed {
                reason: state.closed.clone().unwrap_or_default(),
            }
            .into()),
        }
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed.is_some()
    }

    fn closed_reason(&self) -> String {
        lock(&self.state)
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".to_owned())
    }
}

/// Events from one [`Qmp`] session.
pub struct EventStream {
    rx: broadcast::Receiver<Event>,
}

impl EventStream {
    /// The next event; fails when the connection closes or `limit` passes.
    pub async fn next(&mut self, limit: Duration) -> Result<Event> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.rx.recv()).await {
                Ok(Ok(event)) => return Ok(event),
                Ok(Err(broadcast::error::RecvError::Lagged(missed))) => {
                    tracing::warn!(missed, "QMP event subscriber fell behind; events lost");
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    return Err(QmpError::Closed {
                        reason: "QEMU closed the QMP connection while an event was awaited"
                            .to_owned(),
                    }
                    .into());
                }
                Err(_) => {
                    return Err(QmpError::Timeout {
                        what: "a QMP event".to_owned(),
                        after: limit,
                    }
                    .into());
                }
            }
        }
    }

    /// An event already received, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        loop {
            match self.rx.try_recv() {
                Ok(event) => return Some(event),
                Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "QMP event subscriber fell behind; events lost");
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits for the first event named `name` that `matches`, skipping others.
    pub async fn wait_for(
        &mut self,
        name: &str,
        limit: Duration,
        matches: impl Fn(&Event) -> bool,
    ) -> Result<Event> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .next(left)
                .await
                .map_err(|err| match err.downcast::<QmpError>() {
                    Ok(QmpError::Timeout { .. }) => QmpError::Timeout {
                        what: format!("event {name}"),
                        after: limit,
                    }
                    .into(),
                    Ok(other) => other.into(),
                    Err(other) => other,
                })?;
            if event.name == name && matches(&event) {
                return Ok(event);
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic elsewhere while holding the lock leaves the state usable.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

/// Reads up to the greeting. QEMU 10 can put an event (a `RESUME` as the guest starts) on a
/// connection before its greeting (seen once in a CI run); events before it are skipped.
async fn read_greeting(
    lines: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    socket: &Path,
) -> Result<Greeting> {
    loop {
        let mut line = String::new();
        let n = lines
            .read_line(&mut line)
            .await
            .with_context(|| format!("reading the QMP greeting on {}", socket.display()))?;
        if n == 0 {
            return Err(QmpError::Closed {
                reason: format!("{} closed before its greeting", socket.display()),
            }
            .into());
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("parsing the QMP greeting {:?}", line.trim()))?;
        if value.get("event").is_some() {
            tracing::debug!(line = line.trim(), "QMP event before the greeting; skipped");
            continue;
        }
        return serde_json::from_value(value)
            .with_context(|| format!("parsing the QMP greeting {:?}", line.trim()));
    }
}

async fn read_loop(mut lines: BufReader<OwnedReadHalf>, state: Arc<Mutex<State>>) {
    let reason = loop {
        let mut line = String::new();
        match lines.read_line(&mut line).await {
            Ok(0) => break "QEMU closed the QMP socket (did it exit?)".to_owned(),
            Err(err) => break format!("reading from QMP failed: {err}"),
            Ok(_) => {}
        }
        tracing::trace!(line = %line.trim_end(), "QMP <-");
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(line = %line.trim_end(), "QMP sent a line that is not JSON");
            continue;
        };
        if message.get("event").is_some() {
            match serde_json::from_value::<Event>(message) {
                Ok(event) => {
                    if let Some(events) = &lock(&state).events {
                        // No subscriber is fine: nobody waits for this one.
                        let _ = events.send(event);
                    }
                }
                Err(err) => tracing::warn!(%err, "undecodable QMP event"),
            }
            continue;
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            tracing::debug!(%message, "QMP reply without our id");
            continue;
        };
        let waiter = {
            let mut state = lock(&state);
            state.inband_unanswered.remove(&id);
            state.pending.remove(&id)
        };
        let Some((command, reply_to)) = waiter else {
            // Its waiter timed out and left.
            continue;
        };
        let reply = if let Some(value) = message.get("return") {
            Ok(value.clone())
        } else {
            let body: ErrorBody = message
                .get("error")
                .cloned()
                .and_then(|e| serde_json::from_value(e).ok())
                .unwrap_or(ErrorBody {
                    class: "Unknown".to_owned(),
                    desc: message.to_string(),
                });
            Err(QmpError::Command {
                command,
                class: body.class,
                desc: body.desc,
            })
        };
        let _ = reply_to.send(reply);
    };
    tracing::debug!(%reason, "QMP connection closed");
    let mut state = lock(&state);
    state.closed = Some(reason.clone());
    state.events = None;
    for (_, (command, reply_to)) in state.pending.drain() {
        let _ = reply_to.send(Err(QmpError::Closed {
            reason: format!("{reason}; `{command}` got no reply"),
        }));
    }
}

/// Typed commands, named and shaped after QEMU's QAPI schema (checked against 7.2).
pub mod commands {
    use super::{Empty, QmpCommand};
    use serde::{Deserialize, Serialize};

    macro_rules! command {
        ($ty:ident, $name:literal, $reply:ty) => {
            impl QmpCommand for $ty {
                const NAME: &'static str = $name;
                type Reply = $reply;
            }
        };
    }

    #[derive(Serialize)]
    pub struct QmpCapabilities {
        /// Capabilities to turn on, e.g. `oob`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub enable: Option<Vec<&'static str>>,
    }
    command!(QmpCapabilities, "qmp_capabilities", Empty);

    #[derive(Serialize)]
    pub struct QueryStatus {}
    command!(QueryStatus, "query-status", StatusInfo);

    #[derive(Debug, Deserialize)]
    pub struct StatusInfo {
        /// QEMU's RunState: `running`, `paused`, `inmigrate`, `postmigrate`, `finish-migrate`...
        pub status: String,
        pub running: bool,
    }

    #[derive(Serialize)]
    pub struct Stop {}
    command!(Stop, "stop", Empty);

    #[derive(Serialize)]
    pub struct Cont {}
    command!(Cont, "cont", Empty);

    #[derive(Serialize)]
    pub struct Quit {}
    command!(Quit, "quit", Empty);

    #[derive(Serialize)]
    pub struct MigrateSetCapabilities {
        pub capabilities: Vec<MigrationCapabilityStatus>,
    }
    command!(MigrateSetCapabilities, "migrate-set-capabilities", Empty);

    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct MigrationCapabilityStatus {
        /// A `MigrationCapability`, e.g. `pause-before-switchover`, `events`, `postcopy-ram`.
        pub capability: String,
        pub state: bool,
    }

    #[derive(Serialize)]
    pub struct QueryMigrateCapabilities {}
    command!(
        QueryMigrateCapabilities,
        "query-migrate-capabilities",
        Vec<MigrationCapabilityStatus>
    );

    /// `migrate-set-parameters`; only the fields set are sent.
    #[derive(Default, Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct MigrateSetParameters {
        /// Bytes per second.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_bandwidth: Option<u64>,
        /// Bytes per second in post-copy; 0 is no cap.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_postcopy_bandwidth: Option<u64>,
        /// Milliseconds.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub downtime_limit: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub multifd_channels: Option<u8>,
        /// `none`, `legacy` (the main thread looks) or `multifd` (each channel's thread).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub zero_page_detection: Option<&'static str>,
        /// Percent of vCPU time taken when auto-converge first throttles.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub cpu_throttle_initial: Option<u8>,
        /// Percent added per pass that still does not converge.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub cpu_throttle_increment: Option<u8>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub announce_initial: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub announce_max: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub announce_rounds: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub announce_step: Option<u64>,
    }
    command!(MigrateSetParameters, "migrate-set-parameters", Empty);

    #[derive(Serialize)]
    pub struct QueryMigrateParameters {}
    command!(
        QueryMigrateParameters,
        "query-migrate-parameters",
        MigrationParameters
    );

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct MigrationParameters {
        pub max_bandwidth: Option<u64>,
        pub max_postcopy_bandwidth: Option<u64>,
        pub downtime_limit: Option<u64>,
        pub multifd_channels: Option<u8>,
        #[serde(default)]
        pub zero_page_detection: Option<String>,
    }

    #[derive(Serialize)]
    pub struct Migrate {
        pub uri: String,
        /// Resume a post-copy migration that is `postcopy-paused`, on a new connection.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub resume: Option<bool>,
    }
    command!(Migrate, "migrate", Empty);

    /// The destination of a `postcopy-paused` migration listens on `uri` for the
    /// source's `migrate` with `resume`.
    #[derive(Serialize)]
    pub struct MigrateRecover {
        pub uri: String,
    }
    command!(MigrateRecover, "migrate-recover", Empty);

    /// Breaks post-copy's stream on purpose (either side): it goes to `postcopy-paused`.
    #[derive(Serialize)]
    pub struct MigratePause {}
    command!(MigratePause, "migrate-pause", Empty);

    #[derive(Serialize)]
    pub struct MigrateIncoming {
        pub uri: String,
    }
    command!(MigrateIncoming, "migrate-incoming", Empty);

    #[derive(Serialize)]
    pub struct MigrateContinue {
        /// The `MigrationStatus` the source is paused in: `pre-switchover`.
        pub state: String,
    }
    command!(MigrateContinue, "migrate-continue", Empty);

    #[derive(Serialize)]
    pub struct MigrateStartPostcopy {}
    command!(MigrateStartPostcopy, "migrate-start-postcopy", Empty);

    #[derive(Serialize)]
    pub struct MigrateCancel {}
    command!(MigrateCancel, "migrate_cancel", Empty);

    #[derive(Serialize)]
    pub struct QueryMigrate {}
    command!(QueryMigrate, "query-migrate", MigrationInfo);

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct MigrationInfo {
        /// A `MigrationStatus`; absent before the first migration.
        pub status: Option<String>,
        pub ram: Option<MigrationStats>,
        /// Milliseconds; while active, the time so far.
        pub total_time: Option<u64>,
        /// Milliseconds; only once completed.
        pub downtime: Option<u64>,
        pub expected_downtime: Option<u64>,
        pub setup_time: Option<u64>,
        pub error_desc: Option<String>,
        /// Set while auto-converge throttles the guest.
        pub cpu_throttle_percentage: Option<u64>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct MigrationStats {
        pub transferred: u64,
        pub remaining: u64,
        pub total: u64,
        pub duplicate: u64,
        pub normal: u64,
        pub normal_bytes: u64,
        pub dirty_sync_count: u64,
        /// Megabits per second.
        pub mbps: f64,
        #[serde(default)]
        pub dirty_pages_rate: u64,
        /// The bytes per page of the page counts (`page-size`, since QEMU 2.10).
        #[serde(default)]
        pub page_size: u64,
        #[serde(default)]
        pub precopy_bytes: u64,
        #[serde(default)]
        pub postcopy_bytes: u64,
        /// Bytes sent over the multifd channels.
        #[serde(default)]
        pub multifd_bytes: u64,
    }

    /// `announce-self`: QEMU 7.2 requires every timing field.
    #[derive(Serialize)]
    pub struct AnnounceSelf {
        /// Milliseconds before the first round.
        pub initial: u64,
        /// Milliseconds, the longest gap between rounds.
        pub max: u64,
        pub rounds: u64,
        /// Milliseconds added to the gap each round.
        pub step: u64,
    }
    command!(AnnounceSelf, "announce-self", Empty);

    /// `SocketAddressLegacy` (as `nbd-server-start` takes it): `{type, data: {...}}`.
    #[derive(Clone, Debug, Serialize)]
    pub struct InetAddressLegacy {
        /// Always `inet`.
        #[serde(rename = "type")]
        pub kind: &'static str,
        pub data: InetSocketAddress,
    }

    /// `InetSocketAddress`; QEMU takes the port as a string.
    #[derive(Clone, Debug, Serialize)]
    pub struct InetSocketAddress {
        pub host: String,
        pub port: String,
    }

    #[derive(Serialize)]
    pub struct NbdServerStart {
        pub addr: InetAddressLegacy,
    }
    command!(NbdServerStart, "nbd-server-start", Empty);

    #[derive(Serialize)]
    pub struct NbdServerStop {}
    command!(NbdServerStop, "nbd-server-stop", Empty);

    /// `block-export-add` of type `nbd` (`BlockExportOptions` with `BlockExportOptionsNbd`).
    #[derive(Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct BlockExportAddNbd {
        /// Always `nbd`.
        #[serde(rename = "type")]
        pub kind: &'static str,
        pub id: String,
        pub node_name: String,
        pub writable: bool,
        /// The export name clients ask for; defaults to the node name.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
    }
    command!(BlockExportAddNbd, "block-export-add", Empty);

    #[derive(Serialize)]
    pub struct BlockExportDel {
        pub id: String,
        /// `safe` (fails while clients are connected) or `hard`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub mode: Option<&'static str>,
    }
    command!(BlockExportDel, "block-export-del", Empty);

    #[derive(Serialize)]
    pub struct QueryBlockExports {}
    command!(
        QueryBlockExports,
        "query-block-exports",
        Vec<BlockExportInfo>
    );

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct BlockExportInfo {
        pub id: String,
        pub node_name: String,
        pub shutting_down: bool,
    }

    /// `blockdev-add` of an NBD client node (`BlockdevOptionsNbd`, flat `SocketAddress`).
    #[derive(Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct BlockdevAddNbd {
        /// Always `nbd`.
        pub driver: &'static str,
        pub node_name: String,
        pub server: InetSocketAddressFlat,
        pub export: String,
    }
    command!(BlockdevAddNbd, "blockdev-add", Empty);

    /// `SocketAddress` of type `inet` (flat: `{type, host, port}`).
    #[derive(Clone, Debug, Serialize)]
    pub struct InetSocketAddressFlat {
        #[serde(rename = "type")]
        pub kind: &'static str,
        pub host: String,
        pub port: String,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct BlockdevDel {
        pub node_name: String,
    }
    command!(BlockdevDel, "blockdev-del", Empty);

    #[derive(Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct BlockdevMirror {
        pub job_id: String,
        /// The source node.
        pub device: String,
        /// The target node (already added with `blockdev-add`).
        pub target: String,
        /// `MirrorSyncMode`: `full` copies the whole disk.
        pub sync: &'static str,
        /// Bytes per second; 0 is unlimited.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub speed: Option<u64>,
        /// `MirrorCopyMode`: `background` or `write-blocking`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub copy_mode: Option<&'static str>,
    }
    command!(BlockdevMirror, "blockdev-mirror", Empty);

    #[derive(Serialize)]
    pub struct BlockJobCancel {
        /// The job id.
        pub device: String,
        /// Without force, cancelling a READY mirror finishes it with a consistent copy.
        pub force: bool,
    }
    command!(BlockJobCancel, "block-job-cancel", Empty);

    #[derive(Serialize)]
    pub struct QueryBlockJobs {}
    command!(QueryBlockJobs, "query-block-jobs", Vec<BlockJobInfo>);

    #[derive(Clone, Debug, Deserialize)]
    pub struct BlockJobInfo {
        #[serde(rename = "type")]
        pub kind: String,
        /// The job id.
        pub device: String,
        pub len: u64,
        pub offset: u64,
        pub ready: bool,
        /// A `JobStatus`: `running`, `ready`, `concluded`...
        pub status: String,
        pub error: Option<String>,
    }

    impl Default for AnnounceSelf {
        /// QEMU's own defaults: 5 rounds, 50 ms, then 150, 250... up to 550 ms apart.
        fn default() -> Self {
            Self {
                initial: 50,
                max: 550,
                rounds: 5,
                step: 100,
            }
        }
    }
}

use commands::QmpCapabilities;

#[cfg(test)]
mod tests {
    use super::{commands::*, *};
    use tokio::net::UnixListener;

    /// A scripted QEMU: greets, then answers each line with `respond(line)`.
    async fn fake_qemu(
        dir: &Path,
        respond: impl Fn(Value) -> Vec<String> + Send + 'static,
    ) -> PathBuf {
        fake_qemu_after(dir, "", respond).await
    }

    /// The same, writing `before_greeting` (lines) first.
    async fn fake_qemu_after(
        dir: &Path,
        before_greeting: &'static str,
        respond: impl Fn(Value) -> Vec<String> + Send + 'static,
    ) -> PathBuf {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            write
                .write_all(before_greeting.as_bytes())
                .await
                .expect("before the greeting");
            write
                .write_all(
                    br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "test"}, "capabilities": ["oob"]}}
"#,
                )
                .await
                .expect("greet");
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).expect("json");
                for out in respond(request) {
                    if out == "CLOSE" {
                        return;
                    }
                    write.write_all(out.as_bytes()).await.expect("write");
                    write.write_all(b"\n").await.expect("write");
                }
            }
        });
        path
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("movarto-qmp-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("tempdir");
        dir
    }

    fn reply(request: &Value, body: &str) -> String {
        format!(r#"{{"return": {body}, "id": {}}}"#, request["id"])
    }

    /// Offered `oob`, the client turns it on, and `run_oob` sends `exec-oob` (a QEMU
    /// answers it while its main thread is busy: here, before an in-band reply).
    #[tokio::test]
    async fn out_of_band_is_negotiated_and_used() {
        let dir = tempdir("oob");
        let path = fake_qemu(&dir, |req| {
            match (req["execute"].as_str(), req["exec-oob"].as_str()) {
                (Some("qmp_capabilities"), _) if req["arguments"]["enable"][0] == "oob" => {
                    vec![reply(&req, "{}")]
                }
                (None, Some("migrate-pause")) => vec![reply(&req, "{}")],
                _ => vec![format!(
                    r#"{{"error": {{"class": "GenericError", "desc": "unexpected"}}, "id": {}}}"#,
                    req["id"]
                )],
            }
        })
        .await;
        let qmp = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect, with oob on");
        qmp.run_oob(&MigratePause {}, Duration::from_secs(5))
            .await
            .expect("migrate-pause out of band");
        let in_band = qmp
            .run_with_timeout(&MigratePause {}, Duration::from_secs(5))
            .await;
        assert!(
            in_band.is_err_and(|err| err.to_string().contains("unexpected")),
            "the same command in band is another message"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A QEMU whose main thread is stuck answers no in-band command. The client stops
    /// sending them before QEMU's queue of 8 fills (QEMU would then stop reading, the
    /// out-of-band commands too), and `exec-oob` still gets through.
    #[tokio::test]
    async fn in_band_commands_stop_before_a_stuck_qemus_queue_fills() {
        let dir = tempdir("stuck");
        let in_band = Arc::new(AtomicU64::new(0));
        let seen = in_band.clone();
        let path = fake_qemu(&dir, move |req| {
            match (req["execute"].as_str(), req["exec-oob"].as_str()) {
                (Some("qmp_capabilities"), _) => vec![reply(&req, "{}")],
                (Some(_), _) => {
                    seen.fetch_add(1, Ordering::Relaxed);
                    vec![]
                }
                (None, _) => vec![reply(&req, "{}")],
            }
        })
        .await;
        let qmp = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        for _ in 0..INBAND_UNANSWERED_MAX {
            let unanswered = qmp
                .run_with_timeout(&QueryStatus {}, Duration::from_millis(50))
                .await;
            assert!(unanswered.is_err());
        }
        tokio::time::sleep(INBAND_STUCK).await;
        let started = Instant::now();
        let refused = qmp
            .run_with_timeout(&QueryStatus {}, Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert!(
            matches!(refused.downcast_ref(), Some(QmpError::Timeout { .. })),
            "{refused:#}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused at once"
        );
        qmp.run_oob(&MigratePause {}, Duration::from_secs(5))
            .await
            .expect("out of band still answered");
        assert_eq!(
            in_band.load(Ordering::Relaxed),
            INBAND_UNANSWERED_MAX as u64,
            "the refused command was never sent"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn typed_replies_errors_and_events() {
        let dir = tempdir("typed");
        let path = fake_qemu(&dir, |req| match req["execute"].as_str() {
            Some("qmp_capabilities") => vec![reply(&req, "{}")],
            Some("query-status") => vec![
                r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#
                    .to_owned(),
                reply(&req, r#"{"status": "paused", "running": false}"#),
            ],
            _ => vec![format!(
                r#"{{"error": {{"class": "GenericError", "desc": "Parameter 'initial' is missing"}}, "id": {}}}"#,
                req["id"]
            )],
        })
        .await;
        let qmp = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        assert_eq!(qmp.greeting().qmp.version.qemu.major, 7);
        let mut events = qmp.subscribe().expect("subscribe");
        let status = qmp.run(&QueryStatus {}).await.expect("query-status");
        assert_eq!(status.status, "paused");
        let stop = events
            .wait_for("STOP", Duration::from_secs(5), |_| true)
            .await
            .expect("STOP event");
        assert_eq!(stop.timestamp.microseconds, 2);
        let err = qmp
            .run(&AnnounceSelf::default())
            .await
            .expect_err("scripted error");
        let qmp_err = err.downcast_ref::<QmpError>().expect("a QmpError");
        assert!(
            matches!(qmp_err, QmpError::Command { desc, .. } if desc.contains("'initial'")),
            "{qmp_err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_event_before_the_greeting_is_skipped() {
        let dir = tempdir("early-event");
        let path = fake_qemu_after(
            &dir,
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"RESUME\"}\n",
            |req| vec![reply(&req, "{}")],
        )
        .await;
        let qmp = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect despite the early event");
        assert_eq!(qmp.greeting().qmp.version.qemu.major, 7);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn qemu_dying_mid_command_fails_every_waiter() {
        let dir = tempdir("dying");
        let path = fake_qemu(&dir, |req| match req["execute"].as_str() {
            Some("qmp_capabilities") => vec![reply(&req, "{}")],
            _ => vec!["CLOSE".to_owned()],
        })
        .await;
        let qmp = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        let mut events = qmp.subscribe().expect("subscribe");
        let started = Instant::now();
        let err = qmp.run(&QueryStatus {}).await.expect_err("QEMU died");
        assert!(
            matches!(
                err.downcast_ref::<QmpError>(),
                Some(QmpError::Closed { .. })
            ),
            "{err:#}"
        );
        let err = events
            .next(Duration::from_secs(10))
            .await
            .expect_err("closed");
        assert!(
            matches!(
                err.downcast_ref::<QmpError>(),
                Some(QmpError::Closed { .. })
            ),
            "{err:#}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "no hang");
        assert!(qmp.is_closed());
        let err = qmp.run(&QueryStatus {}).await.expect_err("closed");
        assert!(format!("{err:#}").contains("closed"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn silence_times_out() {
        let dir = tempdir("silent");
        let path = fake_qemu(&dir, |req| match req["execute"].as_str() {
            Some("qmp_capabilities") => vec![reply(&req, "{}")],
            _ => vec![],
        })
        .await;
        let qmp = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        let err = qmp
            .run_with_timeout(&QueryStatus {}, Duration::from_millis(200))
            .await
            .expect_err("no reply");
        assert!(
            matches!(
                err.downcast_ref::<QmpError>(),
                Some(QmpError::Timeout { .. })
            ),
            "{err:#}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
