//! Shared helpers for knd's benchmark harnesses (`benches/`, `harness = false`), which later
//! issues fill: discovery, prepare and attach latency, telemetry overhead, collectives.
