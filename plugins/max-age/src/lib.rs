//! `max-age`: a retention plugin that drops messages older than a TTL.
//!
//! Params: `{ ttl_ms = N }` or `{ ttl = "10m" }` (exactly one of them). A `ttl` string is a
//! sum of `<integer><unit>` parts, optionally separated by spaces, with units `ms`, `s`,
//! `m`, `h`, `d`, `w` (and their long forms such as `sec`, `min`, `hours`, `days`):
//! `"500ms"`, `"10s"`, `"1h 30m"`, `"2d"`. A TTL of 0 means no limit, as the router's
//! built-in `history_ttl = 0` does.
//!
//! The same semantics as the TTL limit of the router's built-in `LimitsRetention`: the shown
//! oldest messages with `ts < now_ms - ttl` go (the oldest-first prefix of them; the rest go
//! in later rounds).

use serde::Deserialize;
use switchyard_sdk::{ChannelView, RetentionDecision};

/// Params of a `max-age` binding, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Longest a message is kept, in milliseconds.
    pub ttl_ms: Option<u64>,
    /// Longest a message is kept, as a duration string ("10s", "5m", "1h", "2d").
    pub ttl: Option<String>,
}

impl Params {
    /// The TTL in milliseconds.
    pub fn ttl_ms(&self) -> Result<u64, String> {
        match (self.ttl_ms, self.ttl.as_deref()) {
            (Some(ms), None) => Ok(ms),
            (None, Some(s)) => parse_duration_ms(s).map_err(|e| format!("invalid ttl {s:?}: {e}")),
            (Some(_), Some(_)) => Err("give ttl_ms or ttl, not both".into()),
            (None, None) => Err("missing param ttl_ms (or ttl)".into()),
        }
    }
}

/// Parses a duration such as `"10s"`, `"5m"`, `"1h 30m"`, `"2d"` or `"250ms"` into ms.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| "number too large".to_string())?;
        rest = rest[digits..].trim_start();
        let unit_len = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let scale: u64 = match unit {
            "ms" | "msec" | "millis" => 1,
            "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
            "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3_600_000,
            "d" | "day" | "days" => 86_400_000,
            "w" | "week" | "weeks" => 604_800_000,
            "" => return Err(format!("missing unit after {n} (use ms, s, m, h, d or w)")),
            other => return Err(format!("unknown unit {other:?} (use ms, s, m, h, d or w)")),
        };
        let part = n.checked_mul(scale).ok_or("duration too large")?;
        total = total.checked_add(part).ok_or("duration too large")?;
    }
    Ok(total)
}

/// Drops the shown oldest messages older than the TTL.
pub fn policy(input: &ChannelView<'_>, params: &Params) -> Result<RetentionDecision, String> {
    let ttl_ms = params.ttl_ms()?;
    if ttl_ms == 0 {
        return Ok(RetentionDecision::Keep);
    }
    let cutoff = input.now_ms().saturating_sub(ttl_ms);
    let oldest = input.messages();
    let drop = oldest.iter().take_while(|m| m.ts < cutoff).count();
    Ok(match drop {
        0 => RetentionDecision::Keep,
        n => RetentionDecision::DropBelow(oldest[n - 1].offset + 1),
    })
}

switchyard_sdk::export_retention!(policy);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::{v2, ChannelStats, MessageMeta, RetentionInput};

    /// The policy on a v1-style input.
    fn run(input: &RetentionInput, params: &Params) -> Result<RetentionDecision, String> {
        policy(&ChannelView::from_retention(input), params)
    }

    fn input(now_ms: u64) -> RetentionInput {
        let oldest: Vec<_> =
            (1..=10).map(|i| MessageMeta { offset: i, ts: i * 100, size: 10, key: None, tombstone: false }).collect();
        RetentionInput {
            channel: "c".into(),
            stats: ChannelStats { first_offset: 1, last_offset: 10, count: 10, bytes: 100 },
            oldest,
            now_ms,
        }
    }

    fn ms(ttl_ms: u64) -> Params {
        Params { ttl_ms: Some(ttl_ms), ttl: None }
    }

    #[test]
    fn drops_older_than_ttl() {
        // now 1000, cutoff 500: offsets 1..=4 (ts < 500) go, as the built-in policy does.
        assert_eq!(run(&input(1000), &ms(500)), Ok(RetentionDecision::DropBelow(5)));
        assert_eq!(run(&input(1000), &ms(10_000)), Ok(RetentionDecision::Keep));
        assert_eq!(run(&input(100_000), &ms(10)), Ok(RetentionDecision::DropBelow(11)));
        assert_eq!(run(&input(0), &ms(10)), Ok(RetentionDecision::Keep));
        assert_eq!(run(&input(1000), &ms(0)), Ok(RetentionDecision::Keep));
        let empty = RetentionInput { oldest: vec![], ..input(1000) };
        assert_eq!(run(&empty, &ms(1)), Ok(RetentionDecision::Keep));
    }

    #[test]
    fn stops_at_the_first_young_message() {
        // Timestamps need not be monotonic; only the old prefix goes.
        let mut inp = input(1000);
        inp.oldest[2].ts = 900;
        assert_eq!(run(&inp, &ms(500)), Ok(RetentionDecision::DropBelow(3)));
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_duration_ms("2d"), Ok(172_800_000));
        assert_eq!(parse_duration_ms(" 1h 30m "), Ok(5_400_000));
        assert_eq!(parse_duration_ms("1h30m15s"), Ok(5_415_000));
        assert_eq!(parse_duration_ms("3 days"), Ok(259_200_000));
        assert!(parse_duration_ms("").is_err());
        assert!(parse_duration_ms("10").is_err());
        assert!(parse_duration_ms("10x").is_err());
        assert!(parse_duration_ms("h").is_err());
        assert!(parse_duration_ms("-1s").is_err());
        assert!(parse_duration_ms("99999999999999999999s").is_err());
        assert!(parse_duration_ms("9999999999999999w").is_err());
    }

    #[test]
    fn params_through_the_abi() {
        let call = |params: &str| v2::call_retention(params, &input(1000), policy);
        assert_eq!(call(r#"{"ttl_ms":500}"#), Ok(RetentionDecision::DropBelow(5)));
        assert_eq!(call(r#"{"ttl":"1s"}"#), Ok(RetentionDecision::Keep));
        assert_eq!(call(r#"{"ttl":"300ms"}"#), Ok(RetentionDecision::DropBelow(7)));
        assert!(call("{}").unwrap_err().contains("missing param ttl_ms"));
        assert!(call(r#"{"ttl":"1s","ttl_ms":5}"#).unwrap_err().contains("not both"));
        assert!(call(r#"{"ttl":"soon"}"#).unwrap_err().contains("invalid ttl"));
        assert!(call(r#"{"age":"1s"}"#).unwrap_err().contains("unknown field"));
    }
}
