//! Exact decimals for quantities and money: a non-negative amount in nano-units (9 fractional
//! digits) held in an `i128`, never a float. Quantities with more than 9 fractional digits are
//! refused rather than rounded; an amount (quantity times unit price, 18 fractional digits) is
//! rounded half up to 9.

use std::fmt;

/// Fractional digits kept.
pub const SCALE: u32 = 9;
const ONE: i128 = 1_000_000_000;
/// The largest quantity accepted (10^18 units): sums of a lifetime of events stay far from
/// `i128`'s limit, and so do their products with a price.
const MAX_UNITS: i128 = 1_000_000_000_000_000_000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Decimal(i128);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("`{0}` is not a non-negative decimal (digits, at most one `.`)")]
    Syntax(String),
    #[error("`{0}` has more than {SCALE} digits after the point")]
    TooPrecise(String),
    #[error("`{0}` is larger than 10^18")]
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
        if whole.len() > 19 {
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
