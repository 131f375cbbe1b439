//! The price table (`billing.prices`: meter to unit price, in `billing.currency`) and the
//! periods an event counts in (UTC).

use std::collections::BTreeMap;

use time::OffsetDateTime;

use crate::decimal::{Decimal, DecimalError};

/// Unit prices by meter. Empty: quantities only (a platform that prices for itself).
#[derive(Clone, Debug, Default)]
pub struct Prices {
    pub currency: String,
    by_meter: BTreeMap<String, Decimal>,
}

impl Prices {
    /// From the settings; a price that is not an exact non-negative decimal, or a meter that is
    /// not in the catalogue, is refused by name.
    pub fn new(currency: &str, table: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut by_meter = BTreeMap::new();
        for (meter, price) in table {
            if slipway_proto::meters::find(meter).is_none() {
                return Err(format!(
                    "billing.prices.{meter}: not a meter of the catalogue"
                ));
            }
            let p = Decimal::parse(price)
                .map_err(|e: DecimalError| format!("billing.prices.{meter}: {e}"))?;
            if p > Decimal::parse(crate::decimal::MAX_PRICE).unwrap_or(Decimal::ZERO) {
                return Err(format!(
                    "billing.prices.{meter}: at most {} per unit",
                    crate::decimal::MAX_PRICE
                ));
            }
            by_meter.insert(meter.clone(), p);
        }
        Ok(Self {
            currency: currency.to_string(),
            by_meter,
        })
    }

    /// The unit price and amount of `quantity` of `meter`, when priced.
    pub fn price(&self, meter: &str, quantity: Decimal) -> Option<(Decimal, Decimal)> {
        let unit = *self.by_meter.get(meter)?;
        Some((unit, quantity.times(unit)?))
    }
}

fn utc(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `YYYY-MM`: the billing period of an instant.
pub fn period(ms: i64) -> String {
    let t = utc(ms);
    format!("{:04}-{:02}", t.year(), u8::from(t.month()))
}

/// `YYYY-MM-DD`: the day of an instant.
pub fn day(ms: i64) -> String {
    let t = utc(ms);
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}
