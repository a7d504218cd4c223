//! The command line: one thin file per verb (parse, call the library, print). The
//! library (`movarto_user::*`) has no clap types.

pub mod abort;
pub mod agent;
pub mod attach;
pub mod bench;
pub mod check;
pub mod config;
pub mod detach;
pub mod dns;
pub mod evacuate;
pub mod flows;
pub mod generate;
pub mod jobs;
pub mod logging;
pub mod migrate;
pub mod mode;
pub mod monitor;
pub mod service;
pub mod status;
pub mod units;
pub mod vm;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    /// One verb, parsed on its own.
    #[derive(Parser)]
    struct One<T: clap::Args> {
        #[command(flatten)]
        args: T,
    }

    fn agent(extra: &[&str]) -> Result<super::agent::AgentArgs, clap::Error> {
        let base = [
            "agent",
            "--site",
            "a",
            "--token-file",
            "t",
            "--uplink",
            "up0",
        ];
        One::try_parse_from(base.iter().chain(extra)).map(|one| one.args)
    }

    #[test]
    fn agent_durations_need_a_unit() {
        let args = agent(&[]).expect("defaults");
        assert_eq!(args.sweep_interval, Duration::from_secs(1));
        assert_eq!(args.established_idle, Duration::from_secs(300));
        let args =
            agent(&["--sweep-interval", "500ms", "--established-idle", "2m"]).expect("units");
        assert_eq!(args.sweep_interval, Duration::from_millis(500));
        assert_eq!(args.established_idle, Duration::from_secs(120));
        let err = agent(&["--sweep-interval", "5"]).expect_err("no unit");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("has no unit"), "{err}");
    }

    #[test]
    fn bad_macs_tokens_and_modes_are_usage_errors() {
        let base = [
            "attach",
            "up0",
            "--vm-iface",
            "veth0",
            "--home",
            "192.0.2.10",
        ];
        for bad in [
            &["--vm-mac", "02:00:00:00:00"][..],
            &["--token", "xyz"],
            &["--mode", "teleport"],
        ] {
            let err = One::<super::attach::AttachArgs>::try_parse_from(base.iter().chain(bad))
                .err()
                .unwrap_or_else(|| panic!("{bad:?} parsed"));
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn tunnel_modes_refuse_to_attach_without_token_or_endpoints() {
        let base = [
            "attach",
            "up0",
            "--vm-iface",
            "veth0",
            "--home",
            "192.0.2.10",
        ];
        let full = [
            "--local-tunnel",
            "203.0.113.2",
            "--peer-tunnel",
            "203.0.113.1",
            "--token",
            "5eed",
        ];
        for mode in ["receive", "forward", "direct"] {
            // Each of the three left out in turn, and then a zero token.
            for (skip, named) in [(0, "--local-tunnel"), (2, "--peer-tunnel"), (4, "--token")] {
                let mut args: Vec<&str> = base.to_vec();
                args.extend(["--mode", mode]);
                for (i, pair) in full.chunks(2).enumerate() {
                    if i * 2 != skip {
                        args.extend(pair);
                    }
                }
                let parsed = One::<super::attach::AttachArgs>::try_parse_from(&args)
                    .expect("parses")
                    .args;
                let err = super::attach::run(parsed).expect_err("refused before attaching");
                assert!(err.to_string().contains(named), "{mode}: {err}");
            }
            let mut args: Vec<&str> = base.to_vec();
            args.extend(["--mode", mode]);
            args.extend(&full[..4]);
            args.extend(["--token", "0"]);
            let parsed = One::<super::attach::AttachArgs>::try_parse_from(&args)
                .expect("parses")
                .args;
            let err = super::attach::run(parsed).expect_err("token 0 refused");
            assert!(
                format!("{err:#}").contains("token 0 would accept unauthenticated GUE"),
                "{err:#}"
            );
        }
    }
}
