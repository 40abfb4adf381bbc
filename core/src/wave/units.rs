//! Durations and sizes as wave files write them.

use super::check::check_memory_bytes;

/// Parses a duration into milliseconds: `"250ms"`, `"30s"`, `"10m"`, `"1h30m"`, `"2d"`,
/// fractions such as `"1.5h"`, or a bare number of seconds (`"90"`, `"0"`). `"0"` and `"none"`
/// mean no timeout (0). Fractions of a millisecond are dropped.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let invalid = || {
        format!(
            "{s:?} is not a duration; write e.g. \"30s\", \"10m\", \"1h30m\", \"250ms\" \
             or whole seconds"
        )
    };
    if text.is_empty() {
        return Err(invalid());
    }
    if text == "none" {
        return Ok(0);
    }
    if text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return scaled(text, 1_000).ok_or_else(invalid);
    }
    let mut total_ms: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_ms = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(invalid()),
        };
        let part_ms = scaled(number, unit_ms).ok_or_else(invalid)?;
        total_ms = total_ms
            .checked_add(part_ms)
            .ok_or_else(|| format!("{s:?} is too long"))?;
        rest = after;
    }
    Ok(total_ms)
}

/// Parses a memory size into bytes: a whole number of bytes (`"1048576"`), or a number with a
/// unit, binary (`KiB`, `MiB`, `GiB`, `TiB`, `PiB`) or decimal (`B`, `KB`, `MB`, `GB`, `TB`,
/// `PB`), case-insensitive, optionally with one space before the unit and a fraction
/// (`"1.5GiB"`). At most 1 PiB.
pub fn parse_memory_bytes(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let invalid = || {
        format!("{s:?} is not a memory size; write e.g. \"256MiB\", \"1GiB\", \"512MB\" or bytes")
    };
    let number_len = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(number_len);
    let unit = unit.strip_prefix(' ').unwrap_or(unit);
    let unit_bytes: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "pib" => 1 << 50,
        _ => return Err(invalid()),
    };
    let bytes = scaled(number, unit_bytes).ok_or_else(invalid)?;
    check_memory_bytes(bytes).map_err(|m| format!("{s:?} {m}"))?;
    Ok(bytes)
}

/// `number × unit` for a decimal `number` ("12", "1.5", ".5"), truncated; `None` if malformed or
/// too large for u64.
fn scaled(number: &str, unit: u64) -> Option<u64> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let whole_value: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    // Digits past the 18th cannot change a result that is at most u64::MAX units of 1.
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_value: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().ok()?
    };
    let denominator = 10u128.pow(u32::try_from(fraction.len()).ok()?);
    let total = whole_value
        .checked_mul(u128::from(unit))?
        .checked_add(fraction_value * u128::from(unit) / denominator)?;
    u64::try_from(total).ok()
}
