//! One convention for units, shared by every verb and the inventory: durations as
//! `300ms`, `5s`, `2m`, `1h`; bandwidth in MiB/s, as virsh counts it
//! (`virsh migrate-setspeed`, `--bandwidth`).

use std::time::Duration;

/// What `--help` says about durations.
pub const DURATION_HELP: &str = "a number with a unit: ms, s, m or h (300ms, 5s, 2m)";
/// What `--help` says about bandwidth.
pub const BANDWIDTH_HELP: &str = "MiB/s, as virsh counts it; 0 is no cap";

/// `300ms`, `5s`, `2m`, `1h`. The unit is required, so `--max-drain 300` can't be
/// read as milliseconds by one user and seconds by another.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let at = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit: {DURATION_HELP}"))?;
    let (number, unit) = s.split_at(at);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: {DURATION_HELP}"))?;
    let per_unit = match unit {
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; {DURATION_HELP}")),
    };
    u32::try_from(n)
        .ok()
        .and_then(|n| per_unit.checked_mul(n))
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// MiB/s to bytes per second.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let mib: u64 = s
        .strip_suffix("MiB/s")
        .unwrap_or(s)
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a bandwidth: {BANDWIDTH_HELP}"))?;
    mib.checked_mul(1 << 20)
        .ok_or_else(|| format!("{s:?} MiB/s is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["5", "5d", "s", "", "-1s", "1.5s", "99999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bandwidth_is_mib_per_second() {
        assert_eq!(parse_bandwidth("1250"), Ok(1250 << 20));
        assert_eq!(parse_bandwidth("100MiB/s"), Ok(100 << 20));
        assert_eq!(parse_bandwidth("0"), Ok(0));
        for bad in ["", "fast", "-5", "1.5", "99999999999999999999"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad:?}");
        }
    }
}
