//! Publishing: the device model of ResourceSlices (names, attributes, slices), the operator's device selector, and the watch that republishes when the hardware changes.

pub mod resources;
pub mod selector;
pub mod watch;
