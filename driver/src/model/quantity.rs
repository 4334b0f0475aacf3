//! Kubernetes resource quantities (`1G`, `500M`, `10Gi`, `2.5e9`) as whole numbers: how knd
//! reads a bandwidth share's consumed capacity and writes a device's capacity.

/// The capacity knd publishes on a shared NIC and a share consumes: bits per second.
pub const BANDWIDTH: &str = "bandwidth";

/// A quantity as a whole number of its unit (bits per second for bandwidth), or why it is not
/// one: malformed, negative, fractional after scaling, or beyond `u64`.
pub fn parse(text: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("quantity {text:?}: {why}");
    let (number, suffix) = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .map_or((text, ""), |at| text.split_at(at));
    let number = number.strip_prefix('+').unwrap_or(number);
    if number.is_empty() || number.starts_with('.') && number.len() == 1 {
        return Err(bad("no number"));
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if !whole
        .chars()
        .chain(fraction.chars())
        .all(|c| c.is_ascii_digit())
    {
        return Err(bad("not a number"));
    }
    // The value as digits / 10^scale, then times the suffix.
    let digits: u128 = format!("{whole}{fraction}")
        .parse()
        .map_err(|_| bad("too many digits"))?;
    let mut scale = u32::try_from(fraction.len()).map_err(|_| bad("too many digits"))?;
    let (multiplier, exponent): (u128, i32) = match suffix {
        "" => (1, 0),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "m" => (1, -3),
        "u" => (1, -6),
        "n" => (1, -9),
        other => {
            let exponent = other
                .strip_prefix(['e', 'E'])
                .and_then(|e| e.parse::<i32>().ok())
                .filter(|e| (-18..=18).contains(e))
                .ok_or_else(|| bad("unknown suffix"))?;
            (1, exponent)
        }
    };
    let mut value = digits
        .checked_mul(multiplier)
        .ok_or_else(|| bad("too large"))?;
    if exponent >= 0 {
        value = value
            .checked_mul(10_u128.pow(exponent.unsigned_abs()))
            .ok_or_else(|| bad("too large"))?;
    } else {
        scale += exponent.unsigned_abs();
    }
    let divisor = 10_u128
        .checked_pow(scale)
        .ok_or_else(|| bad("too many digits"))?;
    if value % divisor != 0 {
        return Err(bad("not a whole number"));
    }
    u64::try_from(value / divisor).map_err(|_| bad("too large"))
}

/// `value` as the API writes a whole quantity: the largest exact decimal SI suffix
/// (`100G`, `25G`, `1500M`).
#[must_use]
pub fn format(value: u64) -> String {
    for (suffix, unit) in [
        ("E", 1_000_000_000_000_000_000_u64),
        ("P", 1_000_000_000_000_000),
        ("T", 1_000_000_000_000),
        ("G", 1_000_000_000),
        ("M", 1_000_000),
        ("k", 1_000),
    ] {
        if value >= unit && value.is_multiple_of(unit) {
            return format!("{}{suffix}", value / unit);
        }
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_as_the_api_writes_them() {
        assert_eq!(parse("1G"), Ok(1_000_000_000));
        assert_eq!(parse("2.5G"), Ok(2_500_000_000));
        assert_eq!(parse("500M"), Ok(500_000_000));
        assert_eq!(parse("1Gi"), Ok(1 << 30));
        assert_eq!(parse("1e9"), Ok(1_000_000_000));
        assert_eq!(
            parse("2E3"),
            Ok(2_000),
            "E followed by digits is an exponent"
        );
        assert_eq!(parse("3E"), Ok(3_000_000_000_000_000_000));
        assert_eq!(parse("100"), Ok(100));
        assert_eq!(
            parse("1500m"),
            Err("quantity \"1500m\": not a whole number".into())
        );
        assert_eq!(parse("2000m"), Ok(2));
        for bad in ["", "G", "-1G", "1X", "1.2.3", "99999999999E", "1e99"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(format(100_000_000_000), "100G");
        assert_eq!(format(1_500_000_000), "1500M");
        assert_eq!(format(1_234), "1234");
        for value in [1, 999, 1_000, 25_000_000_000, u64::MAX] {
            assert_eq!(parse(&format(value)), Ok(value));
        }
    }
}
