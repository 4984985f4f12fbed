//! Human sizes: parsing `10G`, `512MiB`, `1.5T`, `4096` and printing `10 GiB`.
//!
//! Suffixes K, M, G, T (case-insensitive) are powers of 1024, optionally
//! followed by `iB` or `B` (so `10G`, `10GB` and `10GiB` are all 10 × 2^30);
//! a bare number, or one with a trailing `B`, is bytes. A decimal fraction is
//! allowed when the result is a whole number of bytes.

/// Parses a size; the error says what is wrong and what is expected.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!(
            "invalid size {text:?}: {why}; use bytes or a number with a K, M, G or T suffix (powers of 1024), e.g. 10G, 512M, 4096"
        )
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim_start());
    if num.is_empty() {
        return Err(bad("it does not start with a number"));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(bad(&format!("unknown unit {unit:?}"))),
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if frac.contains('.') || num.starts_with('.') || num.ends_with('.') {
        return Err(bad("it is not a number"));
    }
    let too_big = || bad("it is too large");
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_big())?
    };
    let mut bytes = int.checked_shl(shift).ok_or_else(too_big)?;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(bad("too many decimal places"));
        }
        let f: u128 = frac.parse().map_err(|_| bad("it is not a number"))?;
        let denom = 10u128.pow(frac.len() as u32);
        let scaled = f << shift;
        if !scaled.is_multiple_of(denom) {
            return Err(bad("it is not a whole number of bytes"));
        }
        bytes += scaled / denom;
    }
    if bytes > u64::MAX as u128 {
        return Err(too_big());
    }
    Ok(bytes as u64)
}

/// `10 GiB`, `1.5 MiB`, `512 B`: binary units, at most one decimal.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let div = 1u64 << (10 * unit);
    if bytes.is_multiple_of(div) {
        format!("{} {}", bytes / div, UNITS[unit])
    } else {
        let v = bytes as f64 / div as f64;
        let s = format!("{v:.1}");
        // 1023.96 KiB would print as "1024.0 KiB"; fine, and rare.
        format!("{s} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("4096", 4096),
            ("4096B", 4096),
            ("1K", 1024),
            ("1k", 1024),
            ("1KiB", 1024),
            ("1KB", 1024),
            ("64K", 65536),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("10G", 10 << 30),
            ("10g", 10 << 30),
            ("10GB", 10 << 30),
            ("10GiB", 10 << 30),
            ("10 GiB", 10 << 30),
            ("2T", 2 << 40),
            ("1.5G", 3 << 29),
            ("0.5K", 512),
            (" 1M ", 1 << 20),
            ("16383P", 16383 << 50),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        for text in [
            "",
            "G",
            "abc",
            "10X",
            "10 GG",
            "-1",
            "1.2.3",
            "0.1K",
            "1.",
            ".",
            ".5K",
            "99999999999999999999999",
            "20000000P",
            "1e9",
            "10Gi",
        ] {
            let e = parse_size(text).err();
            assert!(e.is_some(), "{text:?} should be rejected");
            assert!(e.unwrap().contains("invalid size"));
        }
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(65536), "64 KiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
    }
}
