//! The model: the records and ports every stage shares (claim config, claim, pod and attachment records, distance findings, device reports, link settings and readings) — plain data, no I/O.

pub mod claim;
pub mod config;
pub mod distance;
pub mod link;
pub mod ports;
pub mod quantity;
pub mod records;

/// An error with its causes, `a: b: c`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
