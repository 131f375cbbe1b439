//! Figures every benchmark reports: medians and percentiles of its samples, in milliseconds.

use std::time::Duration;

pub fn median(v: &[Duration]) -> Duration {
    percentile(v, 50)
}

pub fn percentile(v: &[Duration], p: usize) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
