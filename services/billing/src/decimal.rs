//! Exact decimals for quantities and money: a non-negative amount in nano-units (9 fractional
//! digits) held in an `i128`, never a float. Quantities with more than 9 fractional digits are
//! refused rather than rounded; an amount (quantity times unit price, 18 fractional digits) is
//! rounded half up to 9.

use std::fmt;

/// Fractional digits kept.
pub const SCALE: u32 = 9;
const ONE: i128 = 1_000_000_000;
/// The largest quantity or price accepted, in units (10^15): a quantity times a price of at
/// most `MAX_PRICE` stays inside `i128` (10^24 x 10^14 nano-units), and so do sums of a lifetime
/// of events.
const MAX_UNITS: i128 = 1_000_000_000_000_000;
/// The largest unit price (10^5 of the currency).
pub const MAX_PRICE: &str = "100000";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Decimal(i128);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("`{0}` is not a non-negative decimal (digits, at most one `.`)")]
    Syntax(String),
    #[error("`{0}` has more than {SCALE} digits after the point")]
    TooPrecise(String),
    #[error("`{0}` is larger than 10^15")]
    TooLarge(String),
}

impl Decimal {
    pub const ZERO: Decimal = Decimal(0);

    /// Parses `12`, `0.25`, `1500.000`: ASCII digits with at most one point, no sign, no
    /// exponent, at most 9 fractional digits.
    pub fn parse(s: &str) -> Result<Self, DecimalError> {
        let syntax = || DecimalError::Syntax(s.chars().take(40).collect());
        let (whole, frac) = match s.split_once('.') {
            Some((w, f)) => (w, f),
            None => (s, ""),
        };
        let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty()
            || !digits(whole)
            || !digits(frac)
            || (s.contains('.') && frac.is_empty())
        {
            return Err(syntax());
        }
        if frac.len() > SCALE as usize {
            return Err(DecimalError::TooPrecise(s.chars().take(40).collect()));
        }
        let whole = whole.trim_start_matches('0');
        if whole.len() > 16 {
            return Err(DecimalError::TooLarge(s.chars().take(40).collect()));
        }
        let w: i128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| syntax())?
        };
        if w > MAX_UNITS {
            return Err(DecimalError::TooLarge(s.chars().take(40).collect()));
        }
        let mut f: i128 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| syntax())?
        };
        for _ in frac.len()..SCALE as usize {
            f *= 10;
        }
        Ok(Decimal(w * ONE + f))
    }

    /// Parses a stored sum (an aggregate or an amount), which may pass the input bounds: only
    /// the syntax and `i128` bound it.
    pub fn parse_sum(s: &str) -> Result<Self, DecimalError> {
        if s.ends_with('.') {
            return Err(DecimalError::Syntax(s.chars().take(40).collect()));
        }
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        let too_large = || DecimalError::TooLarge(s.chars().take(40).collect());
        let w: i128 = whole
            .parse()
            .map_err(|_| DecimalError::Syntax(s.chars().take(40).collect()))?;
        let head = Decimal::parse(&format!("0.{}", if frac.is_empty() { "0" } else { frac }))?;
        if w < 0 || whole.starts_with(['+', '-']) {
            return Err(DecimalError::Syntax(s.chars().take(40).collect()));
        }
        w.checked_mul(ONE)
            .and_then(|w| w.checked_add(head.0))
            .map(Decimal)
            .ok_or_else(too_large)
    }

    pub fn checked_add(self, other: Decimal) -> Option<Decimal> {
        self.0.checked_add(other.0).map(Decimal)
    }

    /// `self × price`, rounded half up to 9 fractional digits.
    pub fn times(self, price: Decimal) -> Option<Decimal> {
        let product = self.0.checked_mul(price.0)?;
        Some(Decimal((product + ONE / 2) / ONE))
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Decimal {
    /// The shortest exact form: `12`, `0.25` (no trailing zeros, no exponent).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / ONE;
        let frac = self.0 % ONE;
        if frac == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{frac:09}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::parse(s).unwrap()
    }

    #[test]
    fn parses_exact_decimals_and_prints_them_shortest() {
        for (input, shown) in [
            ("0", "0"),
            ("12", "12"),
            ("0.25", "0.25"),
            ("1500.000", "1500"),
            ("007.50", "7.5"),
            ("0.000000001", "0.000000001"),
            ("1000000000000000", "1000000000000000"),
        ] {
            assert_eq!(d(input).to_string(), shown, "{input}");
        }
    }

    #[test]
    fn refuses_what_is_not_an_exact_non_negative_decimal() {
        for bad in [
            "", ".5", "5.", "-1", "+1", "1e3", " 1", "1 ", "1,5", "1.2.3", "0x10", "١",
        ] {
            assert!(
                matches!(Decimal::parse(bad), Err(DecimalError::Syntax(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Decimal::parse("1.0000000001"),
            Err(DecimalError::TooPrecise(_))
        ));
        for big in ["1000000000000001", "99999999999999999999999"] {
            assert!(
                matches!(Decimal::parse(big), Err(DecimalError::TooLarge(_))),
                "{big}"
            );
        }
    }

    #[test]
    fn stored_sums_pass_the_input_bounds_and_stay_exact() {
        let big = Decimal::parse_sum("1800000000000000.5").unwrap();
        assert_eq!(big.to_string(), "1800000000000000.5");
        let sum = big.checked_add(d("1000000000000000")).unwrap();
        assert_eq!(Decimal::parse_sum(&sum.to_string()).unwrap(), sum);
        assert_eq!(
            Decimal::parse_sum("100000000000000000000")
                .unwrap()
                .to_string(),
            "100000000000000000000"
        );
        for bad in ["", "-1", "+1", "1.", "x", "1.0000000001"] {
            assert!(Decimal::parse_sum(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sums_and_prices_exactly_rounding_half_up() {
        assert_eq!(d("0.1").checked_add(d("0.2")).unwrap(), d("0.3"));
        assert_eq!(d("3").times(d("0.000003")).unwrap(), d("0.000009"));
        assert_eq!(d("1234.5").times(d("2")).unwrap(), d("2469"));
        // 0.000000001 x 0.5 = 0.0000000005: half, rounded up.
        assert_eq!(d("0.000000001").times(d("0.5")).unwrap(), d("0.000000001"));
        // 0.000000001 x 0.4 = 0.0000000004: rounded down.
        assert_eq!(d("0.000000001").times(d("0.4")).unwrap(), Decimal::ZERO);
        assert!(d("0").is_zero() && !d("0.000000001").is_zero());
        // The largest quantity times the largest price stays exact.
        assert_eq!(
            d("1000000000000000")
                .times(d(MAX_PRICE))
                .unwrap()
                .to_string(),
            "100000000000000000000"
        );
    }
}
