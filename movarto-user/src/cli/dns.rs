//! `movarto-user dns show|update`.

use std::{
    io::Write,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use movarto_user::dns::{
    TsigKey, ZoneServer, parse_name, parse_server,
    records::{self, Rrset, ServiceRecords, UpdateReport},
};
use serde::Serialize;

use super::units::{DURATION_HELP, parse_duration};

#[derive(Subcommand)]
pub enum DnsCommand {
    /// Show a name's A and AAAA records and the zone's serial, as the authoritative server holds them.
    Show(ShowArgs),
    /// Change a name's addresses or TTL with a TSIG-signed RFC 2136 update, then verify it.
    ///
    /// With --to, the A/AAAA RRsets become exactly the given addresses, only if they still
    /// hold --from (default: what the server holds when the command starts). With only --ttl,
    /// the TTL changes and the addresses stay; when it is lowered, the command waits out the
    /// old TTL unless --no-wait.
    Update(UpdateArgs),
}

#[derive(Args)]
pub struct ServerArgs {
    /// Authoritative server: ADDRESS or ADDRESS:PORT (port 53 by default).
    #[arg(long, short = 's')]
    pub server: String,
    /// The zone that holds the name.
    #[arg(long, short = 'z')]
    pub zone: String,
    /// BIND key file, as tsig-keygen writes it.
    #[arg(long, short = 'k', conflicts_with = "key")]
    pub key_file: Option<PathBuf>,
    /// Key as nsupdate -y takes it: [alg:]name:base64secret.
    #[arg(long = "key", short = 'y')]
    pub key: Option<String>,
    #[arg(long, default_value = "3s", value_parser = parse_duration,
          help = format!("How long to wait for each answer: {DURATION_HELP}"))]
    pub timeout: Duration,
}

#[derive(Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The name, e.g. svc.example.test.
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The name, e.g. svc.example.test.
    pub name: String,
    /// New addresses (repeat for several; IPv4 goes to A, IPv6 to AAAA).
    #[arg(long)]
    pub to: Vec<IpAddr>,
    /// Addresses the records must still hold (the RFC 2136 prerequisite). A family given
    /// here but not in --to is deleted.
    #[arg(long, requires = "to")]
    pub from: Vec<IpAddr>,
    /// TTL in seconds of the records after the update.
    #[arg(long)]
    pub ttl: Option<u32>,
    /// After lowering the TTL, do not wait out the old one.
    #[arg(long)]
    pub no_wait: bool,
    #[arg(long, default_value = "10s", value_parser = parse_duration,
          help = format!("How long to wait for the authoritative answer to show the change: \
                          {DURATION_HELP}"))]
    pub verify_timeout: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl ServerArgs {
    fn zone_server(&self, key_required: bool) -> Result<ZoneServer> {
        let server = parse_server(&self.server)?;
        let zone = parse_name(&self.zone).context("--zone")?;
        let key = match (&self.key_file, &self.key) {
            (Some(path), _) => Some(TsigKey::from_file(path)?),
            (None, Some(spec)) => Some(TsigKey::from_spec(spec)?),
            (None, None) if key_required => {
                bail!("updates must be signed: give --key-file FILE or -y [alg:]name:secret")
            }
            (None, None) => None,
        };
        if self.timeout.is_zero() {
            bail!("--timeout must be positive");
        }
        let mut zone_server = ZoneServer::new(server, zone, key);
        zone_server.timeout = self.timeout;
        Ok(zone_server)
    }
}

pub fn run(command: DnsCommand) -> Result<()> {
    run_to(command, &mut std::io::stdout().lock())
}

pub fn run_to(command: DnsCommand, out: &mut dyn Write) -> Result<()> {
    match command {
        DnsCommand::Show(args) => {
            let server = args.server.zone_server(false)?;
            let name = parse_name(&args.name)?;
            let records = records::show(&server, &name)?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&records)?)?;
            } else {
                print_records(out, &records)?;
            }
        }
        DnsCommand::Update(args) => update(args, out)?,
    }
    Ok(())
}

#[derive(Serialize)]
struct UpdateOutput {
    #[serde(flatten)]
    report: UpdateReport,
    /// Longest TTL caches may still hold the old answer for, when the TTL was lowered.
    planned_wait_secs: u32,
    waited: bool,
}

fn update(args: UpdateArgs, out: &mut dyn Write) -> Result<()> {
    let start = Instant::now();
    let server = args.server.zone_server(true)?;
    let name = parse_name(&args.name)?;
    let verify_timeout = args.verify_timeout;
    let (report, planned_wait) = if args.to.is_empty() {
        let Some(ttl) = args.ttl else {
            bail!("nothing to do: give --to ADDRESS and/or --ttl SECONDS");
        };
        let (report, old_ttl) = records::set_ttl(&server, &name, ttl, verify_timeout)?;
        (report, if ttl < old_ttl { old_ttl } else { 0 })
    } else {
        let expected = (!args.from.is_empty()).then_some(args.from.as_slice());
        let report = records::replace_addresses(
            &server,
            &name,
            expected,
            &args.to,
            args.ttl,
            start,
            verify_timeout,
        )?;
        (report, 0)
    };
    let wait = planned_wait > 0 && !args.no_wait;
    if args.json {
        let output = UpdateOutput {
            report,
            planned_wait_secs: planned_wait,
            waited: wait,
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&output)?)?;
    } else {
        writeln!(
            out,
            "updated {} in zone {} at {}: serial {} -> {}, authoritative answer changed after {} ms",
            report.after.name,
            report.after.zone,
            report.after.server,
            report.before.serial,
            report.after.serial,
            report.answer_changed_after_ms
        )?;
        print_change(out, &report.before.a, &report.after.a)?;
        print_change(out, &report.before.aaaa, &report.after.aaaa)?;
        if planned_wait > 0 {
            writeln!(
                out,
                "TTL lowered: caches may hold the old answer for up to {planned_wait} s{}",
                if wait {
                    "; waiting it out (skip with --no-wait)"
                } else {
                    "; not waiting (--no-wait)"
                }
            )?;
        }
    }
    out.flush()?;
    if wait {
        std::thread::sleep(Duration::from_secs(u64::from(planned_wait)));
        if !args.json {
            writeln!(out, "old TTL of {planned_wait} s has passed")?;
        }
    }
    Ok(())
}

fn print_records(out: &mut dyn Write, records: &ServiceRecords) -> Result<()> {
    writeln!(
        out,
        "{} in zone {} at {} (serial {})",
        records.name, records.zone, records.server, records.serial
    )?;
    for rrset in [&records.a, &records.aaaa] {
        if rrset.addresses.is_empty() {
            writeln!(out, "  {:<5} (none)", rrset.record_type)?;
        }
        for addr in &rrset.addresses {
            writeln!(out, "  {:<5} {:>6}  {addr}", rrset.record_type, rrset.ttl)?;
        }
    }
    Ok(())
}

fn print_change(out: &mut dyn Write, before: &Rrset, after: &Rrset) -> Result<()> {
    if before == after {
        return Ok(());
    }
    let show = |r: &Rrset| {
        if r.addresses.is_empty() {
            "(none)".to_owned()
        } else {
            let addrs: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
            format!("{} TTL {}", addrs.join(" "), r.ttl)
        }
    };
    writeln!(
        out,
        "  {:<5} {} -> {}",
        after.record_type,
        show(before),
        show(after)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// Parses `dns ...` on its own.
    #[derive(Parser)]
    #[command(name = "dns")]
    struct DnsCli {
        #[command(subcommand)]
        command: DnsCommand,
    }

    /// `dns update svc.example.test -s 192.0.2.53 -z example.test` and `extra`.
    fn update(extra: &[&str]) -> DnsCli {
        let base = [
            "dns",
            "update",
            "svc.example.test",
            "-s",
            "192.0.2.53",
            "-z",
            "example.test",
        ];
        DnsCli::try_parse_from(base.iter().chain(extra)).expect("parses")
    }

    #[test]
    fn parses_update_arguments() {
        let cli = update(&[
            "-y",
            "k:c2VjcmV0",
            "--to",
            "203.0.113.20",
            "--to",
            "2001:db8::20",
            "--from",
            "198.51.100.10",
            "--ttl",
            "20",
        ]);
        let DnsCommand::Update(args) = cli.command else {
            panic!("not update");
        };
        assert_eq!(args.to.len(), 2);
        assert_eq!(args.from.len(), 1);
        assert_eq!(args.ttl, Some(20));
        let server = args.server.zone_server(true).expect("server");
        assert_eq!(server.server, "192.0.2.53:53".parse().expect("addr"));
        assert!(server.zone.is_fqdn());
        assert_eq!(server.timeout, Duration::from_secs(3));
        assert_eq!(args.verify_timeout, Duration::from_secs(10));
    }

    #[test]
    fn timeouts_take_units() {
        let DnsCommand::Update(args) = update(&[
            "--ttl",
            "20",
            "--timeout",
            "500ms",
            "--verify-timeout",
            "1m",
        ])
        .command
        else {
            panic!("not update");
        };
        assert_eq!(args.server.timeout, Duration::from_millis(500));
        assert_eq!(args.verify_timeout, Duration::from_secs(60));
    }

    #[test]
    fn updates_need_a_key() {
        let cli = update(&["--ttl", "20"]);
        let err = run_to(cli.command, &mut Vec::new()).expect_err("unsigned");
        assert!(err.to_string().contains("must be signed"), "{err}");
    }
}
