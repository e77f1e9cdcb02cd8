//! The ranges of every numeric command-line option, checked while clap parses them.
//!
//! A value outside its range is a usage error: clap prints the option, the value and the
//! range, and the command exits with status 2, the same as for any other invalid option.
//! Config files go through [`VmConfig::validate`](crate::utils::config::VmConfig::validate),
//! which checks the same limits.

use crate::utils::config::{NumericLimit, MEMORY_MIB_LIMIT, VCPUS_LIMIT};

/// Range of `--timeout` in seconds: up to one week, which keeps every deadline computed
/// from it far from the overflow of `Instant`.
pub const TIMEOUT_SECS_LIMIT: NumericLimit = NumericLimit {
    min: 0,
    max: 7 * 24 * 3600,
    unit: "seconds",
};

/// Parses `text` as a decimal integer inside `limit`.
fn parse_within(text: &str, limit: &NumericLimit) -> Result<u64, String> {
    let value: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number: {}", limit.describe()))?;
    limit.check(value)
}

/// Parses `--vcpus`.
pub fn parse_vcpus(text: &str) -> Result<u8, String> {
    let value = parse_within(text, &VCPUS_LIMIT)?;
    // VCPUS_LIMIT ends at MAX_VCPUS, which is a u8, so the conversion cannot fail.
    u8::try_from(value).map_err(|_| VCPUS_LIMIT.describe())
}

/// Parses `--memory`.
pub fn parse_memory_mib(text: &str) -> Result<u64, String> {
    parse_within(text, &MEMORY_MIB_LIMIT)
}

/// Parses `--timeout`.
pub fn parse_timeout_secs(text: &str) -> Result<u64, String> {
    parse_within(text, &TIMEOUT_SECS_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_bounds() {
        assert_eq!(parse_vcpus("1"), Ok(1));
        assert_eq!(parse_vcpus("64"), Ok(64));
        for text in ["0", "65", "300", "99999999999999999999", "two", "-1"] {
            let message = parse_vcpus(text).unwrap_err();
            assert!(message.contains("1 to 64"), "{text}: {message}");
        }
    }

    #[test]
    fn out_of_range_message_names_value() {
        let message = parse_vcpus("300").unwrap_err();
        assert!(message.contains("300"), "{message}");
        let message = parse_memory_mib("0").unwrap_err();
        assert!(message.contains('0'), "{message}");
        assert!(message.contains("MiB"), "{message}");
    }

    #[test]
    fn timeout_bounds() {
        assert_eq!(parse_timeout_secs("0"), Ok(0));
        assert_eq!(parse_timeout_secs("604800"), Ok(604_800));
        assert!(parse_timeout_secs("604801").is_err());
        assert!(parse_timeout_secs("18446744073709551615").is_err());
    }
}
