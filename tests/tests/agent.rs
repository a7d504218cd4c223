//! The agent's control API over TLS: with the site's certificate trusted it answers;
//! plain HTTP, an untrusted certificate and a missing token get nowhere.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use movarto_lab::{
    movarto_user,
    netns::{Netns, in_netns},
    tempdir::TempDir,
};
use movarto_tests::require_root;
use movarto_user::agent::{AgentClient, AgentError};

const TOKEN: &str = "tls-test-token-0123456789abcdef";

#[test]
fn the_agent_serves_tls_with_its_certificate_and_refuses_the_rest() {
    require_root();
    let ns = Netns::new("agenttls").expect("netns");
    let scratch = TempDir::new("movarto-agent-tls").expect("dir");
    let dir = scratch.path().to_owned();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    fs::write(dir.join("cert.pem"), cert.cert.pem()).expect("cert");
    fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).expect("key");
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    fs::write(dir.join("other.pem"), other.cert.pem()).expect("cert");
    fs::write(dir.join("token"), TOKEN).expect("token");
    fs::set_permissions(dir.join("token"), fs::Permissions::from_mode(0o600)).expect("chmod");

    let log = fs::File::create(dir.join("agent.log")).expect("log");
    let _agent = ns
        .spawn(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", ns.name()))
                .arg(movarto_user().expect("movarto-user"))
                .args(["agent", "--site", "tls", "--uplink", "lo"])
                .args(["--listen", "127.0.0.1:7878"])
                .arg("--token-file")
                .arg(dir.join("token"))
                .arg("--tls-cert")
                .arg(dir.join("cert.pem"))
                .arg("--tls-key")
                .arg(dir.join("key.pem"))
                .stdout(Stdio::null())
                .stderr(Stdio::from(log)),
        )
        .expect("agent");

    let (status, plain, untrusted, no_token) = in_netns(&ns, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let trusted =
                AgentClient::new("https://127.0.0.1:7878", TOKEN, Some(&dir.join("cert.pem")))
                    .expect("client");
            let deadline = Instant::now() + Duration::from_secs(10);
            while trusted.health().await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the agent did not answer over TLS: {}",
                    fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let status = trusted.status().await.map(|s| s.site);
            let plain = AgentClient::new("http://127.0.0.1:7878", TOKEN, None)
                .expect("client")
                .status()
                .await;
            let untrusted = AgentClient::new(
                "https://127.0.0.1:7878",
                TOKEN,
                Some(&dir.join("other.pem")),
            )
            .expect("client")
            .status()
            .await;
            let no_token =
                AgentClient::new("https://127.0.0.1:7878", "", Some(&dir.join("cert.pem")))
                    .expect("client")
                    .status()
                    .await;
            (status, plain, untrusted, no_token)
        })
    })
    .expect("the namespace");
    assert_eq!(status.expect("status over TLS"), "tls");
    assert!(plain.is_err(), "plain HTTP to a TLS agent must fail");
    assert!(
        matches!(untrusted, Err(AgentError::Unreachable { ref reason, .. }) if reason.contains("certificate")),
        "a certificate nobody vouched for is refused: {untrusted:?}"
    );
    assert!(
        matches!(no_token, Err(AgentError::Refused { status: 401, .. })),
        "{no_token:?}"
    );
}
