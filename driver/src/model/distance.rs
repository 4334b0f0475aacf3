//! Distance classes between PCI devices (`nvidia-smi topo -m`'s PIX … SYS) and the finding a
//! prepared device records: how far it is from its claim's closest GPU.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::config::DistanceName;

/// Distance between two PCI devices, best first (the derived order compares closeness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Distance {
    /// At most one PCIe switch between them.
    Pix,
    /// Several PCIe switches between them, without crossing the host bridge.
    Pxb,
    /// Same root complex (host bridge), reached through it.
    Phb,
    /// Same NUMA node, different root complexes.
    Node,
    /// Different NUMA nodes (crossing the inter-socket link).
    Sys,
}

impl Distance {
    /// Every class, best first.
    pub const ALL: [Self; 5] = [Self::Pix, Self::Pxb, Self::Phb, Self::Node, Self::Sys];

    /// The name `nvidia-smi topo -m` prints.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pix => "PIX",
            Self::Pxb => "PXB",
            Self::Phb => "PHB",
            Self::Node => "NODE",
            Self::Sys => "SYS",
        }
    }

    /// Parses a class name (any case).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(text))
    }
}

impl From<DistanceName> for Distance {
    fn from(name: DistanceName) -> Self {
        match name {
            DistanceName::Pix => Self::Pix,
            DistanceName::Pxb => Self::Pxb,
            DistanceName::Phb => Self::Phb,
            DistanceName::Node => Self::Node,
            DistanceName::Sys => Self::Sys,
        }
    }
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Distance {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Distance {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{text}` is not a distance class (PIX, PXB, PHB, NODE or SYS)"
            ))
        })
    }
}

/// A NIC's distance to the closest GPU of its claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// The GPU's PCI address.
    pub gpu: String,
    /// Their distance class (kept as `PIX` … `SYS`).
    pub class: Distance,
    /// The worst class the claim accepts.
    pub required: Distance,
}

impl Finding {
    /// Whether the class is no worse than required.
    pub fn aligned(&self) -> bool {
        self.class <= self.required
    }

    /// A sentence for the claim status and logs.
    pub fn describe(&self, device: &str) -> String {
        format!(
            "NIC {device} and GPU {} are {} apart (required: {} or better)",
            self.gpu, self.class, self.required
        )
    }
}
