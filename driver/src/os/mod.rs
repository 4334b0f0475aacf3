//! The operating-system seams: network namespaces, netlink, ethtool, the host root (sysfs and procfs), the state store and retry backoff.

pub mod backoff;
pub mod ethtool;
pub mod host;
pub mod netlink;
pub mod netns;
pub mod state;
