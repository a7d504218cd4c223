//! The binary as a process, unprivileged (an agent on the loopback with no datapath
//! attached): with `--log-format json` every line the agent and the orchestrator write
//! on stderr is one JSON object, log lines with `level` and `fields`, and the default
//! stays human; under systemd (`NOTIFY_SOCKET`) the agent says READY=1 once it serves
//! and STOPPING=1 when stopped.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_movarto-user");

/// A scratch directory of this test's own, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("movarto-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let token = dir.join("token");
        std::fs::write(&token, "a-token-for-the-log-format-test\n").expect("token");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Self(dir)
    }

    fn token(&self) -> PathBuf {
        self.0.join("token")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent, on the loopback; its pin name is this test's own, so no datapath is found.
fn agent(scratch: &Path, format: Option<&str>) -> Child {
    let mut command = Command::new(BIN);
    // systemd's socket, as Type=notify sets it; the notification test reads it.
    command.env("NOTIFY_SOCKET", scratch.join("notify"));
    if let Some(format) = format {
        command.args(["--log-format", format]);
    }
    command
        .args(["agent", "--site", "logtest", "--uplink", "lo"])
        .arg("--pin-name")
        .arg(format!("mvt-logtest-{}", std::process::id()))
        .args(["--listen", "127.0.0.1:0", "--token-file"])
        .arg(scratch.join("token"))
        .arg("--state-dir")
        .arg(scratch.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the agent")
}

/// Runs the agent until it serves, stops it with SIGTERM; its stderr lines, and what
/// it told systemd.
fn agent_lines(format: Option<&str>) -> (Vec<String>, Vec<String>) {
    let scratch = Scratch::new(&format!("log-{}", format.unwrap_or("default")));
    let notify = std::os::unix::net::UnixDatagram::bind(scratch.0.join("notify")).expect("socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut child = agent(&scratch.0, format);
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("agent serving") {
                let _ = tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    let served = rx.recv_timeout(Duration::from_secs(20));
    // SAFETY: our own child, by its PID (not reaped yet).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    let lines = reader.join().expect("reader");
    assert!(served.is_ok(), "the agent did not serve: {lines:#?}");
    assert!(status.success(), "the agent exited {status}: {lines:#?}");
    let mut told = Vec::new();
    let mut buf = [0u8; 256];
    while told.len() < 2 {
        match notify.recv(&mut buf) {
            Ok(n) => told.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()),
            Err(_) => break,
        }
    }
    (lines, told)
}

/// Every line is a JSON log event; returns them.
fn json_lines(lines: &[String]) -> Vec<Value> {
    assert!(!lines.is_empty());
    lines
        .iter()
        .map(|line| {
            let event: Value =
                serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
            event
        })
        .collect()
}

fn is_log_event(event: &Value) -> bool {
    event["level"].is_string() && event["fields"].is_object() && event["timestamp"].is_string()
}

#[test]
fn the_agent_logs_one_json_object_per_line() {
    let events = json_lines(&agent_lines(Some("json")).0);
    for event in &events {
        assert!(is_log_event(event), "not a log event: {event}");
    }
    let serving = events
        .iter()
        .find(|e| e["fields"]["message"] == "agent serving")
        .expect("the serving line");
    assert_eq!(serving["level"], "INFO");
    // Structured fields stay fields, not text in the message.
    assert_eq!(serving["fields"]["site"], "logtest");
    assert!(
        serving["fields"]["listen"]
            .as_str()
            .is_some_and(|l| l.starts_with("127.0.0.1:")),
        "{serving}"
    );
    assert!(
        events.iter().any(|e| e["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("agent stopping"))),
        "the shutdown is logged: {events:?}"
    );
}

#[test]
fn the_default_stays_human() {
    let (lines, told) = agent_lines(None);
    assert_eq!(told, ["READY=1", "STOPPING=1"], "what systemd was told");
    let serving = lines
        .iter()
        .find(|l| l.contains("agent serving"))
        .expect("the serving line");
    assert!(serde_json::from_str::<Value>(serving).is_err(), "{serving}");
    assert!(serving.contains("INFO"), "{serving}");
}

/// The orchestrator, following a migration at an agent that isn't there: its retries
/// and its failure are JSON lines too (the progress defaults to JSON events).
#[test]
fn the_orchestrator_logs_json_and_fails_in_json() {
    let scratch = Scratch::new("log-migrate");
    let out = Command::new(BIN)
        .args(["--log-format", "json", "migrate", "--resume", "web-1-ab"])
        // Port 9 on the loopback: nothing listens (discard is not served here).
        .args(["--source", "http://127.0.0.1:9", "--source-token-file"])
        .arg(scratch.token())
        .args(["--agent-timeout", "1s"])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .output()
        .expect("running migrate");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<String> = stderr.lines().map(str::to_owned).collect();
    let events = json_lines(&lines);
    let logs: Vec<&Value> = events.iter().filter(|e| is_log_event(e)).collect();
    assert!(
        logs.iter().any(|e| e["level"] == "DEBUG"),
        "the retries are logged: {stderr}"
    );
    let last = logs.last().expect("log lines");
    assert_eq!(last["level"], "ERROR", "{stderr}");
    assert!(
        last["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("127.0.0.1:9")),
        "{last}"
    );
    // Whatever is not a log line is a progress event.
    for event in events.iter().filter(|e| !is_log_event(e)) {
        assert!(
            event["event"].is_string(),
            "neither log nor progress: {event}"
        );
    }
}
