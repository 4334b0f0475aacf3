//! CEL device selectors with the semantics of DRA (`device.driver`, `device.attributes[domain]`,
//! `device.capacity[domain]`), used by `--filter` and by claim explanations.

use std::{collections::HashMap, sync::Arc};

use cel::{
    Context, Program, Value as CelValue,
    objects::{Key, Map},
};

use crate::{
    discover::inventory::{Exclusion, ExclusionReason, Inventory},
    publish::resources::{self, DRIVER_NAME, Value},
};

/// Longest expression accepted, as in the API (10 KiB).
pub const MAX_EXPRESSION_BYTES: usize = 10 * 1024;

/// Errors from compiling or evaluating a selector.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The expression is longer than the API allows.
    #[error("CEL expression is {0} bytes; at most 10240 are allowed")]
    TooLong(usize),
    /// The expression does not parse.
    #[error("CEL expression `{expression}` does not parse: {message}")]
    Parse {
        /// The expression.
        expression: String,
        /// What the parser said.
        message: String,
    },
    /// Evaluation failed (e.g. an attribute the device lacks).
    #[error("CEL expression `{expression}` failed on device {device}: {message}")]
    Eval {
        /// The expression.
        expression: String,
        /// The device it was evaluated for.
        device: String,
        /// What the interpreter said.
        message: String,
    },
    /// The result is not a boolean.
    #[error("CEL expression `{expression}` returned {value} for device {device}, not a bool")]
    NotBool {
        /// The expression.
        expression: String,
        /// The device.
        device: String,
        /// What it returned.
        value: String,
    },
}

/// A device as CEL selectors see it: `device.driver`, `device.attributes[domain].name`,
/// `device.capacity[domain]`.
#[derive(Clone)]
pub struct Device {
    name: String,
    value: CelValue,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({})", self.name)
    }
}

impl Device {
    /// Builds the CEL view of device `name` of `driver` with its fully qualified attributes
    /// (`domain/name`; unqualified names belong to `driver`'s domain).
    pub fn new(
        name: &str,
        driver: &str,
        attributes: &std::collections::BTreeMap<String, Value>,
    ) -> Self {
        Self::with_sharing(name, driver, attributes, false)
    }

    /// [`Device::new`] for a device that does (`shared`) or does not allow multiple
    /// allocations (`device.allowMultipleAllocations`, KEP-5075). Its capacities are not
    /// offered to CEL: they are Kubernetes quantities, a type the expressions here cannot
    /// compare.
    pub fn with_sharing(
        name: &str,
        driver: &str,
        attributes: &std::collections::BTreeMap<String, Value>,
        shared: bool,
    ) -> Self {
        let mut domains: HashMap<String, HashMap<Key, CelValue>> = HashMap::new();
        // The standard domain and the driver's own always exist, so `device.attributes[d]` is a
        // map (possibly empty) rather than an error for them.
        domains.entry(driver.to_owned()).or_default();
        domains
            .entry("resource.kubernetes.io".to_owned())
            .or_default();
        for (name, value) in attributes {
            let (domain, id) = name.rsplit_once('/').unwrap_or((driver, name.as_str()));
            let value = match value {
                Value::Str(s) => CelValue::String(Arc::new(s.clone())),
                Value::Int(i) => CelValue::Int(*i),
                Value::Bool(b) => CelValue::Bool(*b),
            };
            domains
                .entry(domain.to_owned())
                .or_default()
                .insert(Key::String(Arc::new(id.to_owned())), value);
        }
        let map = |entries: HashMap<Key, CelValue>| {
            CelValue::Map(Map {
                map: Arc::new(entries),
            })
        };
        let attributes = map(domains
            .into_iter()
            .map(|(domain, ids)| (Key::String(Arc::new(domain)), map(ids)))
            .collect());
        let capacity = map(HashMap::from([(
            Key::String(Arc::new(driver.to_owned())),
            map(HashMap::new()),
        )]));
        let value = map(HashMap::from([
            (
                Key::String(Arc::new("driver".to_owned())),
                CelValue::String(Arc::new(driver.to_owned())),
            ),
            (Key::String(Arc::new("attributes".to_owned())), attributes),
            (Key::String(Arc::new("capacity".to_owned())), capacity),
            (
                Key::String(Arc::new("allowMultipleAllocations".to_owned())),
                CelValue::Bool(shared),
            ),
        ]));
        Self {
            name: name.to_owned(),
            value,
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A compiled selector expression.
pub struct Selector {
    expression: String,
    program: Program,
}

impl std::fmt::Debug for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Selector({})", self.expression)
    }
}

impl Selector {
    /// Keeps only the NICs of `inventory` this selector accepts; the others are excluded with
    /// the reason.
    pub fn retain_in(&self, inventory: &mut Inventory) {
        for nic in std::mem::take(&mut inventory.nics) {
            let attributes = resources::attributes(&nic);
            let name = resources::device_name(&nic);
            let reason = match self.matches_own(&name, &attributes) {
                Ok(true) => {
                    inventory.nics.push(nic);
                    continue;
                }
                Ok(false) => ExclusionReason::Filter {
                    expression: self.expression().to_owned(),
                },
                Err(err) => ExclusionReason::FilterFailed {
                    message: err.to_string(),
                },
            };
            inventory.excluded.push(Exclusion {
                device: nic.display_name(),
                reason,
            });
        }
    }

    /// Compiles `expression`.
    pub fn compile(expression: &str) -> Result<Self, Error> {
        if expression.len() > MAX_EXPRESSION_BYTES {
            return Err(Error::TooLong(expression.len()));
        }
        let program = Program::compile(expression).map_err(|e| Error::Parse {
            expression: expression.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self {
            expression: expression.to_owned(),
            program,
        })
    }

    /// The source text.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// Evaluates the selector for one device: `driver` and its fully qualified attributes
    /// (`domain/name`; unqualified names belong to `driver`'s domain).
    pub fn matches(
        &self,
        device: &str,
        driver: &str,
        attributes: &std::collections::BTreeMap<String, Value>,
    ) -> Result<bool, Error> {
        self.matches_device(&Device::new(device, driver, attributes))
    }

    /// Evaluates the selector for a device built once with [`Device::new`] (for evaluating many
    /// selectors against the same devices).
    pub fn matches_device(&self, device: &Device) -> Result<bool, Error> {
        let mut context = Context::default();
        context.add_variable_from_value("device", device.value.clone());
        match self.program.execute(&context) {
            Ok(CelValue::Bool(result)) => Ok(result),
            Ok(other) => Err(Error::NotBool {
                expression: self.expression.clone(),
                device: device.name.clone(),
                value: format!("{other:?}"),
            }),
            Err(e) => Err(Error::Eval {
                expression: self.expression.clone(),
                device: device.name.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// The NICs of `inventory` this selector makes shared (`--shared-nics`), with their
    /// capacity in bits per second (see [`Self::share_capacity`]).
    pub fn shared_devices(&self, inventory: &Inventory) -> std::collections::BTreeMap<String, u64> {
        inventory
            .nics
            .iter()
            .filter_map(|nic| Some((resources::device_name(nic), self.share_capacity(nic)?)))
            .collect()
    }

    /// The capacity of `nic` in bits per second when this selector makes it shared: it accepts
    /// the NIC and the NIC's link speed is known.
    pub fn share_capacity(&self, nic: &crate::discover::inventory::Nic) -> Option<u64> {
        let accepted = self
            .matches_own(&resources::device_name(nic), &resources::attributes(nic))
            .unwrap_or(false);
        resources::share_capacity(nic).filter(|_| accepted)
    }

    /// [`Selector::matches`] for a device of knd's own driver.
    pub fn matches_own(
        &self,
        device: &str,
        attributes: &std::collections::BTreeMap<String, Value>,
    ) -> Result<bool, Error> {
        self.matches(device, DRIVER_NAME, attributes)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn attrs() -> BTreeMap<String, Value> {
        BTreeMap::from([
            ("knd.dev/ifName".to_owned(), Value::Str("eth1".into())),
            ("knd.dev/rdma".to_owned(), Value::Bool(true)),
            ("knd.dev/numaNode".to_owned(), Value::Int(1)),
            (
                "resource.kubernetes.io/pcieRoot".to_owned(),
                Value::Str("pci0000:80".into()),
            ),
        ])
    }

    #[test]
    fn dra_style_expressions_evaluate() {
        let yes = [
            r#"device.driver == "knd.dev""#,
            r#"device.attributes["knd.dev"].ifName == "eth1""#,
            r#"device.attributes["knd.dev"].rdma && device.attributes["knd.dev"].numaNode == 1"#,
            r#"device.attributes["resource.kubernetes.io"].pcieRoot.startsWith("pci0000")"#,
            r#"!("sriov" in device.attributes["knd.dev"])"#,
        ];
        for expression in yes {
            let selector = Selector::compile(expression).unwrap();
            assert!(selector.matches_own("d", &attrs()).unwrap(), "{expression}");
        }
        let no = Selector::compile(r#"device.attributes["knd.dev"].numaNode == 0"#).unwrap();
        assert!(!no.matches_own("d", &attrs()).unwrap());
    }

    #[test]
    fn bad_expressions_get_clear_errors() {
        let err = Selector::compile("device.attributes[").unwrap_err();
        assert!(err.to_string().contains("does not parse"), "{err}");
        let err = Selector::compile(&"x".repeat(MAX_EXPRESSION_BYTES + 1)).unwrap_err();
        assert!(err.to_string().contains("at most 10240"), "{err}");
        let missing =
            Selector::compile(r#"device.attributes["knd.dev"].speedMbps > 1000"#).unwrap();
        let err = missing
            .matches_own("pci-0000-01-00-0", &attrs())
            .unwrap_err();
        assert!(err.to_string().contains("pci-0000-01-00-0"), "{err}");
        let not_bool = Selector::compile(r#"device.attributes["knd.dev"].ifName"#).unwrap();
        assert!(matches!(
            not_bool.matches_own("d", &attrs()),
            Err(Error::NotBool { .. })
        ));
    }
}
