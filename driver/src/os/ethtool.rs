//! Device features (`ethtool -k/-K`) over the kernel's ethtool netlink family: read the
//! features a device may change and their wanted state, and change them by name.
//!
//! The `ethtool` crate reads features but cannot change them yet, so the two messages are built
//! here on `genetlink` (family resolution, requests, acks) with the bitset encoding of
//! `Documentation/networking/ethtool-netlink.rst`: verbose bitsets, bits named, a bit listed
//! without `VALUE` is turned off, listing bits without `NOMASK` changes only those.

use std::collections::BTreeMap;

use futures::TryStreamExt as _;
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
    NlasIterator, ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

const FEATURES_GET: u8 = 11; // ETHTOOL_MSG_FEATURES_GET
const FEATURES_SET: u8 = 12; // ETHTOOL_MSG_FEATURES_SET
const A_FEATURES_HEADER: u16 = 1;
const A_FEATURES_HW: u16 = 2;
const A_FEATURES_WANTED: u16 = 3;
const A_HEADER_DEV_NAME: u16 = 2;
const A_BITSET_NOMASK: u16 = 1;
const A_BITSET_BITS: u16 = 3;
const A_BITSET_BITS_BIT: u16 = 1;
const A_BITSET_BIT_NAME: u16 = 2;
const A_BITSET_BIT_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;

/// Errors, each naming the interface.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ethtool family could not be reached (socket, family lookup).
    #[error("ethtool netlink for {interface}: {reason}")]
    Connect {
        /// The interface.
        interface: String,
        /// What failed.
        reason: String,
    },
    /// The kernel refused a request (unknown feature name, no such device, …).
    #[error("{operation} on {interface}: {reason}")]
    Kernel {
        /// What was attempted.
        operation: String,
        /// The interface.
        interface: String,
        /// What the kernel said.
        reason: String,
    },
    /// A feature the device cannot change (fixed, or unknown to it) was asked for.
    #[error("{interface} cannot change feature {feature}: {reason}")]
    Fixed {
        /// The interface.
        interface: String,
        /// The feature.
        feature: String,
        /// Why.
        reason: &'static str,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One ethtool netlink message: a command and its raw attributes.
#[derive(Debug, Clone)]
struct Message {
    command: u8,
    attributes: Vec<u8>,
}

impl GenlFamily for Message {
    fn family_name() -> &'static str {
        "ethtool"
    }

    fn command(&self) -> u8 {
        self.command
    }

    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for Message {
    fn buffer_len(&self) -> usize {
        self.attributes.len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        buffer[..self.attributes.len()].copy_from_slice(&self.attributes);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for Message {
    fn parse_with_param(buffer: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(Self {
            command: header.cmd,
            attributes: buffer.to_vec(),
        })
    }
}

fn nla(kind: u16, value: Vec<u8>) -> DefaultNla {
    DefaultNla::new(kind, value)
}

fn nested(kind: u16, children: &[DefaultNla]) -> DefaultNla {
    let mut value = vec![0; children.buffer_len()];
    children.emit(&mut value);
    nla(kind | NLA_F_NESTED, value)
}

fn string(kind: u16, text: &str) -> DefaultNla {
    let mut value = text.as_bytes().to_vec();
    value.push(0);
    nla(kind, value)
}

fn header(interface: &str) -> DefaultNla {
    nested(A_FEATURES_HEADER, &[string(A_HEADER_DEV_NAME, interface)])
}

fn encode(attributes: &[DefaultNla]) -> Vec<u8> {
    let mut bytes = vec![0; attributes.buffer_len()];
    attributes.emit(&mut bytes);
    bytes
}

/// `(name, value)` of every bit a verbose bitset lists. Without a mask (`NOMASK`), the bits
/// listed are the bits set; with one, the listed bits are the mask and `VALUE` marks those set.
fn bitset_bits(bitset: &[u8]) -> Vec<(String, bool)> {
    let nomask = NlasIterator::new(bitset)
        .flatten()
        .any(|a| a.kind() & !NLA_F_NESTED == A_BITSET_NOMASK);
    let mut bits = Vec::new();
    for attribute in NlasIterator::new(bitset).flatten() {
        if attribute.kind() & !NLA_F_NESTED != A_BITSET_BITS {
            continue;
        }
        for bit in NlasIterator::new(attribute.value()).flatten() {
            if bit.kind() & !NLA_F_NESTED != A_BITSET_BITS_BIT {
                continue;
            }
            let mut name = None;
            let mut value = nomask;
            for field in NlasIterator::new(bit.value()).flatten() {
                match field.kind() & !NLA_F_NESTED {
                    A_BITSET_BIT_NAME => {
                        let raw = field.value();
                        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                        name = Some(String::from_utf8_lossy(&raw[..end]).into_owned());
                    }
                    A_BITSET_BIT_VALUE => value = true,
                    _ => {}
                }
            }
            if let Some(name) = name {
                bits.push((name, value));
            }
        }
    }
    bits
}

/// A device's features: which it may change, and the state wanted for each of those.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Features {
    /// Changeable features (`hw`), by kernel name, with their wanted state.
    pub changeable: BTreeMap<String, bool>,
}

/// An ethtool netlink connection in the calling thread's namespace.
#[derive(Debug)]
pub struct Ethtool {
    handle: genetlink::GenetlinkHandle,
}

impl Ethtool {
    /// Opens a connection in the calling thread's namespace (inside a tokio runtime).
    pub fn connect(interface: &str) -> Result<Self> {
        let (connection, handle, _) = genetlink::new_connection().map_err(|e| Error::Connect {
            interface: interface.to_owned(),
            reason: e.to_string(),
        })?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    async fn request(
        &mut self,
        interface: &str,
        operation: &str,
        message: Message,
        flags: u16,
    ) -> Result<Vec<Message>> {
        let kernel = |reason: String| Error::Kernel {
            operation: operation.to_owned(),
            interface: interface.to_owned(),
            reason,
        };
        let mut request = NetlinkMessage::from(GenlMessage::from_payload(message));
        request.header.flags = NLM_F_REQUEST | flags;
        let replies = self
            .handle
            .request(request)
            .await
            .map_err(|e| kernel(e.to_string()))?;
        let replies: Vec<_> = replies
            .try_collect()
            .await
            .map_err(|e| kernel(e.to_string()))?;
        let mut messages = Vec::new();
        for reply in replies {
            match reply.payload {
                NetlinkPayload::InnerMessage(genl) => messages.push(genl.payload),
                NetlinkPayload::Error(error) if error.code.is_some() => {
                    return Err(kernel(error.to_io().to_string()));
                }
                _ => {}
            }
        }
        Ok(messages)
    }

    /// The features of `interface`.
    pub async fn features(&mut self, interface: &str) -> Result<Features> {
        let message = Message {
            command: FEATURES_GET,
            attributes: encode(&[header(interface)]),
        };
        let replies = self.request(interface, "read features", message, 0).await?;
        let mut hw = Vec::new();
        let mut wanted = BTreeMap::new();
        for reply in &replies {
            for attribute in NlasIterator::new(&reply.attributes).flatten() {
                match attribute.kind() & !NLA_F_NESTED {
                    A_FEATURES_HW => hw = bitset_bits(attribute.value()),
                    A_FEATURES_WANTED => wanted.extend(bitset_bits(attribute.value())),
                    _ => {}
                }
            }
        }
        let changeable = hw
            .into_iter()
            .filter(|(_, changeable)| *changeable)
            .map(|(name, _)| {
                let on = wanted.get(&name).copied().unwrap_or(false);
                (name, on)
            })
            .collect();
        Ok(Features { changeable })
    }

    /// Sets the named features of `interface` on or off (others unchanged), then checks that
    /// each one now has the wanted state: a feature the device cannot change is an error
    /// naming it, not a silent no-op.
    pub async fn set_features(
        &mut self,
        interface: &str,
        features: &BTreeMap<String, bool>,
    ) -> Result<()> {
        let current = self.features(interface).await?;
        for name in features.keys() {
            if !current.changeable.contains_key(name) {
                return Err(Error::Fixed {
                    interface: interface.to_owned(),
                    feature: name.clone(),
                    reason: "it is fixed on this device or has no such name",
                });
            }
        }
        let bits: Vec<DefaultNla> = features
            .iter()
            .map(|(name, on)| {
                let mut fields = vec![string(A_BITSET_BIT_NAME, name)];
                if *on {
                    fields.push(nla(A_BITSET_BIT_VALUE, Vec::new()));
                }
                nested(A_BITSET_BITS_BIT, &fields)
            })
            .collect();
        let wanted = nested(A_FEATURES_WANTED, &[nested(A_BITSET_BITS, &bits)]);
        let message = Message {
            command: FEATURES_SET,
            attributes: encode(&[header(interface), wanted]),
        };
        self.request(interface, "set features", message, NLM_F_ACK)
            .await?;
        let now = self.features(interface).await?;
        for (name, on) in features {
            if now.changeable.get(name) != Some(on) {
                return Err(Error::Fixed {
                    interface: interface.to_owned(),
                    feature: name.clone(),
                    reason: "the device did not take the new state",
                });
            }
        }
        Ok(())
    }
}
