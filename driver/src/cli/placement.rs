//! Device allocation as the Kubernetes scheduler does it for structured parameters (DRA): a
//! claim's requests (`exactly` or `firstAvailable`) select devices from ResourceSlices through
//! their DeviceClass's and their own CEL selectors, `matchAttribute` / `distinctAttribute`
//! constraints tie the chosen devices together, and every device of one allocation comes from
//! one node. Used by `knd explain` (which devices match, which constraint fails and why), to check
//! `knd templates`' output, and by the placement simulation.
//!
//! The search is the allocator's: requests in order, subrequests in order, devices in slice order,
//! backtracking when a constraint fails; only the newest generation of each pool counts.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use k8s_openapi::api::resource::v1::{
    DeviceCapacity, DeviceClaim, DeviceClass, DeviceSelector, DeviceTaint, DeviceToleration,
    ExactDeviceRequest, ResourceSlice,
};

use crate::publish::{
    resources::Value,
    selector::{self, Selector},
};

/// How many devices the search may try before it gives up on a claim.
const SEARCH_BUDGET: usize = 1_000_000;

/// Errors in the inputs: documents, selectors, requests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A document is not YAML or JSON of a known kind.
    #[error("{source_name}: document {index}: {message}")]
    Document {
        /// The file (or `-`).
        source_name: String,
        /// 1-based document number.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// A selector does not compile.
    #[error("{place}: {source}")]
    Selector {
        /// Which class or request it belongs to.
        place: String,
        /// The compiler's error.
        #[source]
        source: selector::Error,
    },
    /// A request or constraint is malformed.
    #[error("claim {claim}: {message}")]
    Claim {
        /// The claim's name.
        claim: String,
        /// What is wrong.
        message: String,
    },
}

/// ResourceSlices, DeviceClasses and claims read from YAML or JSON documents.
#[derive(Debug, Default)]
pub struct Documents {
    /// ResourceSlices.
    pub slices: Vec<ResourceSlice>,
    /// DeviceClasses.
    pub classes: Vec<DeviceClass>,
    /// Claims (from ResourceClaims and ResourceClaimTemplates) by name.
    pub claims: Vec<(String, DeviceClaim)>,
}

impl Documents {
    /// Reads a stream of YAML (or JSON) documents: ResourceSlice, DeviceClass, ResourceClaim,
    /// ResourceClaimTemplate, and `List`s of them (as `kubectl get -o yaml` prints).
    pub fn parse(text: &str, source_name: &str) -> Result<Self, Error> {
        let mut documents = Self::default();
        for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let fail = |message: String| Error::Document {
                source_name: source_name.to_owned(),
                index: i + 1,
                message,
            };
            let value = <serde_json::Value as serde::Deserialize>::deserialize(document)
                .map_err(|e| fail(format!("not YAML: {e}")))?;
            if value.is_null() {
                continue;
            }
            documents.add(value).map_err(fail)?;
        }
        Ok(documents)
    }

    /// Adds everything from `other`.
    pub fn extend(&mut self, other: Self) {
        self.slices.extend(other.slices);
        self.classes.extend(other.classes);
        self.claims.extend(other.claims);
    }

    fn add(&mut self, value: serde_json::Value) -> Result<(), String> {
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or("(unnamed)")
            .to_owned();
        let typed = |e: serde_json::Error| format!("{kind} {name}: {e}");
        match kind.as_str() {
            "ResourceSlice" => self
                .slices
                .push(serde_json::from_value(value).map_err(typed)?),
            "DeviceClass" => self
                .classes
                .push(serde_json::from_value(value).map_err(typed)?),
            "ResourceClaim" => {
                let claim =
                    serde_json::from_value(value["spec"]["devices"].clone()).map_err(typed)?;
                self.claims.push((name, claim));
            }
            "ResourceClaimTemplate" => {
                let claim = serde_json::from_value(value["spec"]["spec"]["devices"].clone())
                    .map_err(typed)?;
                self.claims.push((name, claim));
            }
            list if list.ends_with("List") => {
                let serde_json::Value::Array(items) = value["items"].clone() else {
                    return Err(format!("{list} without items"));
                };
                for item in items {
                    self.add(item)?;
                }
            }
            "" => return Err("no `kind`".to_owned()),
            other => {
                return Err(format!(
                    "kind {other} is none of ResourceSlice, DeviceClass, ResourceClaim, \
                     ResourceClaimTemplate or a List of them"
                ));
            }
        }
        Ok(())
    }
}

/// A published device: driver, pool, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId {
    /// The driver.
    pub driver: String,
    /// The pool.
    pub pool: String,
    /// The device's name in the pool.
    pub device: String,
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.driver, self.pool, self.device)
    }
}

/// One device with what selectors and constraints read from it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Who it is.
    pub id: DeviceId,
    /// The node it is on; `None` for slices available on all nodes.
    pub node: Option<String>,
    /// Its attributes, fully qualified (`domain/name`).
    pub attributes: BTreeMap<String, Value>,
    /// Its taints (KEP-5055).
    pub taints: Vec<DeviceTaint>,
    /// `allowMultipleAllocations` (KEP-5075): allocatable to many claims, each consuming part
    /// of its capacity.
    pub shared: bool,
    /// Its capacities, by name.
    pub capacity: BTreeMap<String, Capacity>,
    cel: selector::Device,
}

/// One capacity of a device (KEP-5075): its total, and how a request consumes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capacity {
    /// The device's whole capacity.
    pub total: u64,
    default: Option<u64>,
    valid_values: Vec<u64>,
    /// `(min, max, step)`.
    range: Option<(u64, Option<u64>, Option<u64>)>,
}

impl Capacity {
    /// The capacity the API object describes (quantities that are not whole numbers: `None`).
    fn of(capacity: &DeviceCapacity) -> Option<Self> {
        let quantity = |q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| {
            crate::model::quantity::parse(&q.0).ok()
        };
        let policy = capacity.request_policy.as_ref();
        Some(Self {
            total: quantity(&capacity.value)?,
            default: policy.and_then(|p| p.default.as_ref()).and_then(quantity),
            valid_values: policy
                .and_then(|p| p.valid_values.as_ref())
                .map(|v| v.iter().filter_map(quantity).collect())
                .unwrap_or_default(),
            range: policy.and_then(|p| p.valid_range.as_ref()).and_then(|r| {
                Some((
                    quantity(&r.min)?,
                    r.max.as_ref().and_then(quantity),
                    r.step.as_ref().and_then(quantity),
                ))
            }),
        })
    }

    /// What a request consumes, as the scheduler rounds it: the amount asked for (`None`: the
    /// policy's default, else the whole capacity), raised to the smallest valid value, or to
    /// the range's minimum and then to a whole number of steps above it; `Err` when that
    /// exceeds every valid value, the range's maximum or the capacity.
    pub fn consume(&self, requested: Option<u64>) -> Result<u64, String> {
        let Some(wanted) = requested.or(self.default) else {
            return Ok(self.total);
        };
        let amount = if self.valid_values.is_empty() {
            match self.range {
                Some((min, max, step)) => {
                    let mut amount = wanted.max(min);
                    if let Some(step) = step.filter(|s| *s > 0) {
                        amount = min + (amount - min).div_ceil(step) * step;
                    }
                    if let Some(max) = max.filter(|m| amount > *m) {
                        return Err(format!(
                            "{wanted} rounds to {amount}, above the maximum {max}"
                        ));
                    }
                    amount
                }
                None => wanted,
            }
        } else {
            *self
                .valid_values
                .iter()
                .find(|v| **v >= wanted)
                .ok_or_else(|| format!("{wanted} is above every valid value"))?
        };
        if amount > self.total {
            return Err(format!("{amount} is more than the device's {}", self.total));
        }
        Ok(amount)
    }
}

/// The devices and classes an allocation chooses from.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Devices, in slice order.
    pub devices: Vec<Entry>,
    classes: BTreeMap<String, Vec<Selector>>,
}

impl Catalog {
    /// Builds the catalog from slices (newest generation of each pool) and classes.
    pub fn new(slices: &[ResourceSlice], classes: &[DeviceClass]) -> Result<Self, Error> {
        let mut newest: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for slice in slices {
            let key = (slice.spec.driver.as_str(), slice.spec.pool.name.as_str());
            let generation = newest.entry(key).or_insert(slice.spec.pool.generation);
            *generation = (*generation).max(slice.spec.pool.generation);
        }
        let mut devices = Vec::new();
        for slice in slices {
            let spec = &slice.spec;
            if newest[&(spec.driver.as_str(), spec.pool.name.as_str())] != spec.pool.generation {
                continue;
            }
            for device in spec.devices.iter().flatten() {
                let attributes = qualified_attributes(&spec.driver, device);
                let shared = device.allow_multiple_allocations == Some(true);
                devices.push(Entry {
                    cel: selector::Device::with_sharing(
                        &device.name,
                        &spec.driver,
                        &attributes,
                        shared,
                    ),
                    id: DeviceId {
                        driver: spec.driver.clone(),
                        pool: spec.pool.name.clone(),
                        device: device.name.clone(),
                    },
                    node: spec.node_name.clone().or_else(|| device.node_name.clone()),
                    attributes,
                    taints: device.taints.clone().unwrap_or_default(),
                    shared,
                    capacity: device
                        .capacity
                        .iter()
                        .flatten()
                        .filter_map(|(name, c)| Some((name.clone(), Capacity::of(c)?)))
                        .collect(),
                });
            }
        }
        let mut catalog = Self {
            devices,
            classes: BTreeMap::new(),
        };
        for class in classes {
            let name = class.metadata.name.clone().unwrap_or_default();
            let selectors = compile(
                class.spec.selectors.as_deref(),
                &format!("DeviceClass {name}"),
            )?;
            catalog.classes.insert(name, selectors);
        }
        Ok(catalog)
    }

    /// The nodes devices are on (one `None` when no slice names a node).
    fn nodes(&self) -> Vec<Option<String>> {
        let nodes: BTreeSet<&String> = self
            .devices
            .iter()
            .filter_map(|d| d.node.as_ref())
            .collect();
        if nodes.is_empty() {
            vec![None]
        } else {
            nodes.into_iter().map(|n| Some(n.clone())).collect()
        }
    }
}

fn qualified_attributes(
    driver: &str,
    device: &k8s_openapi::api::resource::v1::Device,
) -> BTreeMap<String, Value> {
    device
        .attributes
        .iter()
        .flatten()
        .filter_map(|(name, value)| {
            let value = if let Some(s) = value.string.clone().or(value.version.clone()) {
                Value::Str(s)
            } else if let Some(b) = value.bool {
                Value::Bool(b)
            } else {
                Value::Int(value.int?)
            };
            let name = if name.contains('/') {
                name.clone()
            } else {
                format!("{driver}/{name}")
            };
            Some((name, value))
        })
        .collect()
}

fn compile(selectors: Option<&[DeviceSelector]>, place: &str) -> Result<Vec<Selector>, Error> {
    selectors
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((i, s.cel.as_ref()?)))
        .map(|(i, cel)| {
            Selector::compile(&cel.expression).map_err(|source| Error::Selector {
                place: format!("{place}, selector {}", i + 1),
                source,
            })
        })
        .collect()
}

/// How many devices a request wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Count {
    Exact(usize),
    All,
}

/// One way to satisfy a request: the request itself, or one of its `firstAvailable` entries.
#[derive(Debug)]
struct Alternative {
    /// `request` or `request/subrequest`.
    name: String,
    class: String,
    selectors: Vec<Selector>,
    count: Count,
    tolerations: Vec<DeviceToleration>,
    /// `capacity.requests`: amounts by capacity name.
    capacity: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct Request {
    name: String,
    alternatives: Vec<Alternative>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Match(String),
    Distinct(String),
}

#[derive(Debug, Clone)]
struct Constraint {
    /// Requests (or `request/subrequest`s) it covers; empty: all.
    requests: Vec<String>,
    rule: Rule,
}

impl Constraint {
    fn covers(&self, request: &str, alternative: &str) -> bool {
        self.requests.is_empty()
            || self
                .requests
                .iter()
                .any(|r| r == request || r == alternative)
    }

    fn describe(&self) -> String {
        let (what, attribute) = match &self.rule {
            Rule::Match(a) => ("matchAttribute", a),
            Rule::Distinct(a) => ("distinctAttribute", a),
        };
        let scope = if self.requests.is_empty() {
            "all requests".to_owned()
        } else {
            self.requests.join(", ")
        };
        format!("{what} {attribute} over {scope}")
    }

    fn attribute(&self) -> &str {
        match &self.rule {
            Rule::Match(a) | Rule::Distinct(a) => a,
        }
    }
}

/// A claim's device requests and constraints, compiled.
#[derive(Debug)]
pub struct Claim {
    /// The claim's name.
    pub name: String,
    requests: Vec<Request>,
    constraints: Vec<Constraint>,
}

impl Claim {
    /// Compiles a claim's `spec.devices`.
    pub fn compile(name: &str, spec: &DeviceClaim) -> Result<Self, Error> {
        let fail = |message: String| Error::Claim {
            claim: name.to_owned(),
            message,
        };
        let mut requests = Vec::new();
        for request in spec.requests.iter().flatten() {
            let alternatives = match (&request.exactly, &request.first_available) {
                (Some(exactly), None) => vec![alternative(name, &request.name, exactly)?],
                (None, Some(subrequests)) if !subrequests.is_empty() => subrequests
                    .iter()
                    .map(|s| {
                        let exactly = ExactDeviceRequest {
                            allocation_mode: s.allocation_mode.clone(),
                            count: s.count,
                            device_class_name: s.device_class_name.clone(),
                            selectors: s.selectors.clone(),
                            tolerations: s.tolerations.clone(),
                            capacity: s.capacity.clone(),
                            ..ExactDeviceRequest::default()
                        };
                        alternative(name, &format!("{}/{}", request.name, s.name), &exactly)
                    })
                    .collect::<Result<_, _>>()?,
                _ => {
                    return Err(fail(format!(
                        "request {} needs exactly one of `exactly` and `firstAvailable`",
                        request.name
                    )));
                }
            };
            requests.push(Request {
                name: request.name.clone(),
                alternatives,
            });
        }
        if requests.is_empty() {
            return Err(fail("no requests".to_owned()));
        }
        let mut constraints = Vec::new();
        for (i, constraint) in spec.constraints.iter().flatten().enumerate() {
            let rule = match (&constraint.match_attribute, &constraint.distinct_attribute) {
                (Some(a), None) => Rule::Match(a.clone()),
                (None, Some(a)) => Rule::Distinct(a.clone()),
                _ => {
                    return Err(fail(format!(
                        "constraint {} needs exactly one of matchAttribute and distinctAttribute",
                        i + 1
                    )));
                }
            };
            let names = constraint.requests.clone().unwrap_or_default();
            for named in &names {
                let known = requests
                    .iter()
                    .any(|r| &r.name == named || r.alternatives.iter().any(|a| &a.name == named));
                if !known {
                    return Err(fail(format!(
                        "constraint {} names request {named}, which the claim does not have",
                        i + 1
                    )));
                }
            }
            constraints.push(Constraint {
                requests: names,
                rule,
            });
        }
        Ok(Self {
            name: name.to_owned(),
            requests,
            constraints,
        })
    }

    /// Evaluates every selector against every device once, for repeated allocations.
    pub fn evaluate<'c>(&'c self, catalog: &'c Catalog) -> Evaluated<'c> {
        let verdicts = self
            .requests
            .iter()
            .flat_map(|r| &r.alternatives)
            .map(|alternative| {
                catalog
                    .devices
                    .iter()
                    .map(|device| verdict(catalog, alternative, device))
                    .collect()
            })
            .collect();
        Evaluated {
            claim: self,
            catalog,
            verdicts,
        }
    }
}

fn alternative(
    claim: &str,
    name: &str,
    exactly: &ExactDeviceRequest,
) -> Result<Alternative, Error> {
    let count = match exactly.allocation_mode.as_deref() {
        None | Some("ExactCount") => {
            let count = exactly.count.unwrap_or(1);
            Count::Exact(
                usize::try_from(count)
                    .ok()
                    .filter(|c| *c >= 1)
                    .ok_or_else(|| Error::Claim {
                        claim: claim.to_owned(),
                        message: format!("request {name}: count {count} is not positive"),
                    })?,
            )
        }
        Some("All") => Count::All,
        Some(other) => {
            return Err(Error::Claim {
                claim: claim.to_owned(),
                message: format!(
                    "request {name}: allocationMode {other} is neither ExactCount nor All"
                ),
            });
        }
    };
    let capacity = exactly
        .capacity
        .as_ref()
        .and_then(|c| c.requests.as_ref())
        .into_iter()
        .flatten()
        .map(|(capacity, q)| {
            crate::model::quantity::parse(&q.0)
                .map(|amount| (capacity.clone(), amount))
                .map_err(|e| Error::Claim {
                    claim: claim.to_owned(),
                    message: format!("request {name}: capacity.requests[{capacity}]: {e}"),
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(Alternative {
        name: name.to_owned(),
        class: exactly.device_class_name.clone(),
        capacity,
        selectors: compile(
            exactly.selectors.as_deref(),
            &format!("claim {claim}, request {name}"),
        )?,
        count,
        tolerations: exactly.tolerations.clone().unwrap_or_default(),
    })
}

/// Whether a device is acceptable to an alternative: `Ok`, or why not.
fn verdict(catalog: &Catalog, alternative: &Alternative, device: &Entry) -> Result<(), String> {
    let Some(class) = catalog.classes.get(&alternative.class) else {
        return Err(format!(
            "DeviceClass {} is not among the inputs",
            alternative.class
        ));
    };
    let all = class
        .iter()
        .map(|s| (format!("DeviceClass {}", alternative.class), s))
        .chain(
            alternative
                .selectors
                .iter()
                .map(|s| ("the request's selector".to_owned(), s)),
        );
    for (whose, selector) in all {
        match selector.matches_device(&device.cel) {
            Ok(true) => {}
            Ok(false) => return Err(format!("{whose} `{}` is false", selector.expression())),
            Err(e) => return Err(format!("{whose}: {e}")),
        }
    }
    needs(alternative, device)?;
    // As the scheduler: a NoSchedule or NoExecute taint the request does not tolerate rules
    // the device out (`None`, and effects it does not know, do not).
    if let Some(taint) = device.taints.iter().find(|t| {
        matches!(t.effect.as_str(), "NoSchedule" | "NoExecute")
            && !alternative.tolerations.iter().any(|o| tolerates(o, t))
    }) {
        return Err(format!(
            "tainted {}={}:{}, which the request does not tolerate",
            taint.key,
            taint.value.as_deref().unwrap_or_default(),
            taint.effect
        ));
    }
    Ok(())
}

/// What `alternative` consumes of `device`'s capacities (KEP-5075), or why it cannot have it:
/// a capacity it asks for that the device lacks (a qualified name of the device's own driver
/// matches the unqualified one), or an amount the request policy or the capacity refuses.
fn needs(alternative: &Alternative, device: &Entry) -> Result<BTreeMap<String, u64>, String> {
    let local = |name: &str| {
        name.strip_prefix(&format!("{}/", device.id.driver))
            .unwrap_or(name)
            .to_owned()
    };
    let requested: BTreeMap<String, u64> = alternative
        .capacity
        .iter()
        .map(|(name, amount)| (local(name), *amount))
        .collect();
    if let Some(missing) = requested.keys().find(|n| !device.capacity.contains_key(*n)) {
        return Err(format!("has no capacity {missing}"));
    }
    device
        .capacity
        .iter()
        .map(|(name, capacity)| {
            let amount = capacity
                .consume(requested.get(name).copied())
                .map_err(|e| format!("capacity {name}: {e}"))?;
            Ok((name.clone(), amount))
        })
        .collect()
}

/// Whether `toleration` tolerates `taint`, as Kubernetes decides it: the same effect (or any,
/// when empty), the same key (or any, when empty; the API allows that only with `Exists`), and
/// with `Equal` (the default) the same value.
fn tolerates(toleration: &DeviceToleration, taint: &DeviceTaint) -> bool {
    let effect = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = toleration
        .key
        .as_deref()
        .is_none_or(|k| k.is_empty() || k == taint.key);
    let value = match toleration.operator.as_deref() {
        Some("Exists") => true,
        None | Some("Equal") => {
            toleration.value.as_deref().unwrap_or_default()
                == taint.value.as_deref().unwrap_or_default()
        }
        Some(_) => false,
    };
    effect && key && value
}

/// A claim's selectors evaluated against a catalog: allocate as often as needed.
#[derive(Debug)]
pub struct Evaluated<'c> {
    claim: &'c Claim,
    catalog: &'c Catalog,
    /// Per alternative (in request order), per device: accepted or why not.
    verdicts: Vec<Vec<Result<(), String>>>,
}

/// Devices chosen for a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The node.
    pub node: Option<String>,
    /// `(request or request/subrequest, device)`, in request order.
    pub results: Vec<(String, DeviceId)>,
    /// For each result, what it consumes of a shared device's capacities (the allocation
    /// result's `consumedCapacity`; empty for a device allocated whole).
    pub consumed: Vec<BTreeMap<String, u64>>,
}

/// What earlier allocations took: devices allocated whole, and the capacity shares of shared
/// devices consume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Devices allocated whole.
    pub whole: HashSet<DeviceId>,
    /// Per shared device, what its shares consume, by capacity.
    pub consumed: BTreeMap<DeviceId, BTreeMap<String, u64>>,
}

impl Usage {
    /// Records `allocation` as taken.
    pub fn take(&mut self, allocation: &Allocation) {
        for ((_, device), consumed) in allocation.results.iter().zip(&allocation.consumed) {
            if consumed.is_empty() {
                self.whole.insert(device.clone());
            } else {
                let taken = self.consumed.entry(device.clone()).or_default();
                for (name, amount) in consumed {
                    *taken.entry(name.clone()).or_default() += amount;
                }
            }
        }
    }

    /// Gives back what `allocation` took (its pod ended).
    pub fn give_back(&mut self, allocation: &Allocation) {
        for ((_, device), consumed) in allocation.results.iter().zip(&allocation.consumed) {
            if consumed.is_empty() {
                self.whole.remove(device);
                continue;
            }
            let Some(taken) = self.consumed.get_mut(device) else {
                continue;
            };
            for (name, amount) in consumed {
                if let Some(used) = taken.get_mut(name) {
                    *used = used.saturating_sub(*amount);
                }
            }
            taken.retain(|_, used| *used > 0);
            if taken.is_empty() {
                self.consumed.remove(device);
            }
        }
    }

    /// Whether `device` is free for `alternative`: not allocated whole, or, shared, with enough
    /// of each capacity left.
    fn available(&self, alternative: &Alternative, device: &Entry) -> bool {
        if !device.shared {
            return !self.whole.contains(&device.id);
        }
        let Ok(needed) = needs(alternative, device) else {
            return false;
        };
        let taken = self.consumed.get(&device.id);
        needed.iter().all(|(name, amount)| {
            let used = taken.and_then(|t| t.get(name)).copied().unwrap_or(0);
            device
                .capacity
                .get(name)
                .is_some_and(|c| used + amount <= c.total)
        })
    }
}

impl Allocation {
    /// The first device allocated for `request` (or `request/subrequest`).
    pub fn device(&self, request: &str) -> Option<&DeviceId> {
        self.results
            .iter()
            .find(|(r, _)| r == request)
            .map(|(_, device)| device)
    }
}

/// Why a claim could not be allocated on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The node.
    pub node: Option<String>,
    /// The reasons, most specific first.
    pub reasons: Vec<String>,
}

struct Search<'a> {
    evaluated: &'a Evaluated<'a>,
    /// Candidate device indexes per alternative, on the node and free.
    candidates: Vec<Vec<usize>>,
    /// Per alternative: some device it selects on the node is in use (`All` cannot be met).
    partly_busy: Vec<bool>,
    constraints: Vec<&'a Constraint>,
    chosen: Vec<(usize, usize, usize)>,
    steps: usize,
}

impl Search<'_> {
    /// Request `r` onwards; true when everything from `r` is allocated.
    fn requests_from(&mut self, r: usize) -> bool {
        let Some(request) = self.evaluated.claim.requests.get(r) else {
            return true;
        };
        let first = self.alternative_index(r);
        for a in 0..request.alternatives.len() {
            let index = first + a;
            let mark = self.chosen.len();
            let ok = match request.alternatives[a].count {
                Count::Exact(n) => self.pick(r, index, n, 0),
                Count::All => !self.partly_busy[index] && self.pick_all(r, index),
            };
            if ok {
                return true;
            }
            self.chosen.truncate(mark);
        }
        false
    }

    fn alternative_index(&self, r: usize) -> usize {
        self.evaluated.claim.requests[..r]
            .iter()
            .map(|q| q.alternatives.len())
            .sum()
    }

    /// Picks `n` more devices for alternative `index` of request `r` from candidate position
    /// `from` on, then the following requests.
    fn pick(&mut self, r: usize, index: usize, n: usize, from: usize) -> bool {
        if n == 0 {
            return self.requests_from(r + 1);
        }
        for position in from..self.candidates[index].len() {
            self.steps += 1;
            if self.steps > SEARCH_BUDGET {
                return false;
            }
            let device = self.candidates[index][position];
            if self.chosen.iter().any(|c| c.2 == device) || !self.fits(index, device) {
                continue;
            }
            self.chosen.push((r, index, device));
            if self.pick(r, index, n - 1, position + 1) {
                return true;
            }
            self.chosen.pop();
        }
        false
    }

    fn pick_all(&mut self, r: usize, index: usize) -> bool {
        if self.candidates[index].is_empty() {
            return false;
        }
        for position in 0..self.candidates[index].len() {
            let device = self.candidates[index][position];
            if self.chosen.iter().any(|c| c.2 == device) || !self.fits(index, device) {
                return false;
            }
            self.chosen.push((r, index, device));
        }
        self.requests_from(r + 1)
    }

    fn names(&self, index: usize) -> (&str, &str) {
        let mut i = index;
        for request in &self.evaluated.claim.requests {
            if i < request.alternatives.len() {
                return (&request.name, &request.alternatives[i].name);
            }
            i -= request.alternatives.len();
        }
        unreachable!("alternative index {index} within the claim")
    }

    /// Whether `device` for alternative `index` keeps every constraint with what is chosen.
    fn fits(&self, index: usize, device: usize) -> bool {
        let devices = &self.evaluated.catalog.devices;
        let (request, alternative) = self.names(index);
        self.constraints.iter().all(|constraint| {
            if !constraint.covers(request, alternative) {
                return true;
            }
            let Some(value) = devices[device].attributes.get(constraint.attribute()) else {
                return false;
            };
            let mut others = self.chosen.iter().filter(|c| {
                let (q, a) = self.names(c.1);
                constraint.covers(q, a)
            });
            match constraint.rule {
                Rule::Match(_) => others
                    .all(|c| devices[c.2].attributes.get(constraint.attribute()) == Some(value)),
                Rule::Distinct(_) => !others
                    .any(|c| devices[c.2].attributes.get(constraint.attribute()) == Some(value)),
            }
        })
    }
}

impl Evaluated<'_> {
    /// Allocates the claim from devices not in `in_use`: the first node (in name order) where
    /// everything fits, or why it fits nowhere.
    pub fn allocate(&self, in_use: &HashSet<DeviceId>) -> Result<Allocation, Vec<Failure>> {
        self.allocate_with(&Usage {
            whole: in_use.clone(),
            ..Usage::default()
        })
    }

    /// [`Self::allocate`] with shared devices (KEP-5075) partly consumed by earlier claims:
    /// a shared device is never in use whole, and fits while what is left of each of its
    /// capacities covers what the request consumes.
    pub fn allocate_with(&self, usage: &Usage) -> Result<Allocation, Vec<Failure>> {
        let mut failures = Vec::new();
        for node in self.catalog.nodes() {
            match self.allocate_on(node.as_ref(), usage, None) {
                Some(allocation) => return Ok(allocation),
                None => failures.push(Failure {
                    reasons: self.why_not(node.as_ref(), usage),
                    node,
                }),
            }
        }
        Err(failures)
    }

    fn alternatives(&self) -> Vec<&Alternative> {
        self.claim
            .requests
            .iter()
            .flat_map(|r| &r.alternatives)
            .collect()
    }

    fn free_candidates(&self, node: Option<&String>, usage: &Usage) -> Vec<Vec<usize>> {
        self.verdicts
            .iter()
            .zip(self.alternatives())
            .map(|(verdicts, alternative)| {
                verdicts
                    .iter()
                    .enumerate()
                    .filter(|(i, v)| {
                        let device = &self.catalog.devices[*i];
                        v.is_ok()
                            && (device.node.is_none() || device.node.as_ref() == node)
                            && usage.available(alternative, device)
                    })
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect()
    }

    /// The search on one node, leaving out constraint `skip`.
    fn allocate_on(
        &self,
        node: Option<&String>,
        usage: &Usage,
        skip: Option<usize>,
    ) -> Option<Allocation> {
        let partly_busy = self
            .verdicts
            .iter()
            .map(|verdicts| {
                verdicts.iter().zip(&self.catalog.devices).any(|(v, d)| {
                    v.is_ok()
                        && (d.node.is_none() || d.node.as_ref() == node)
                        && !d.shared
                        && usage.whole.contains(&d.id)
                })
            })
            .collect();
        let mut search = Search {
            evaluated: self,
            candidates: self.free_candidates(node, usage),
            partly_busy,
            constraints: self
                .claim
                .constraints
                .iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != skip)
                .map(|(_, c)| c)
                .collect(),
            chosen: Vec::new(),
            steps: 0,
        };
        if !search.requests_from(0) {
            if search.steps > SEARCH_BUDGET {
                tracing::warn!(
                    claim = %self.claim.name,
                    "the allocation search gave up after {SEARCH_BUDGET} devices tried"
                );
            }
            return None;
        }
        let alternatives = self.alternatives();
        let results = search
            .chosen
            .iter()
            .map(|&(_, index, device)| {
                (
                    search.names(index).1.to_owned(),
                    self.catalog.devices[device].id.clone(),
                )
            })
            .collect();
        let consumed = search
            .chosen
            .iter()
            .map(|&(_, index, device)| {
                let device = &self.catalog.devices[device];
                if device.shared {
                    needs(alternatives[index], device).unwrap_or_default()
                } else {
                    BTreeMap::new()
                }
            })
            .collect();
        Some(Allocation {
            node: node.cloned(),
            results,
            consumed,
        })
    }

    /// Why nothing fits on `node`: requests without enough devices, else the constraints that
    /// alone block it (with the values the candidates have), else the combination.
    fn why_not(&self, node: Option<&String>, usage: &Usage) -> Vec<String> {
        let candidates = self.free_candidates(node, usage);
        let mut reasons = Vec::new();
        let mut index = 0;
        for request in &self.claim.requests {
            let mut short = Vec::new();
            for alternative in &request.alternatives {
                let have = candidates[index].len();
                let unavailable: Vec<&Entry> = self.verdicts[index]
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (&self.catalog.devices[i], v))
                    .filter(|(d, v)| v.is_ok() && !usage.available(alternative, d))
                    .map(|(d, _)| d)
                    .collect();
                let taken = unavailable.iter().filter(|d| !d.shared).count();
                let spent = unavailable.len() - taken;
                let busy = match (taken, spent) {
                    (0, 0) => String::new(),
                    (taken, 0) => format!(" ({taken} more are in use)"),
                    (0, spent) => format!(" ({spent} more have too little capacity left)"),
                    (taken, spent) => {
                        format!(" ({taken} more are in use, {spent} have too little capacity left)")
                    }
                };
                match alternative.count {
                    Count::Exact(n) if have < n => short.push(format!(
                        "request {} wants {n} device(s) of class {}; {have} match{busy}",
                        alternative.name, alternative.class
                    )),
                    Count::All if have == 0 || taken > 0 => short.push(format!(
                        "request {} wants all devices of class {} it selects; {have} are free{busy}",
                        alternative.name, alternative.class
                    )),
                    _ => {}
                }
                index += 1;
            }
            if short.len() == request.alternatives.len() {
                reasons.extend(short);
            }
        }
        if !reasons.is_empty() {
            return reasons;
        }
        for (i, constraint) in self.claim.constraints.iter().enumerate() {
            if self.allocate_on(node, usage, Some(i)).is_some() {
                reasons.push(format!(
                    "constraint {} ({}) cannot be met: {}",
                    i + 1,
                    constraint.describe(),
                    self.values(constraint, &candidates)
                ));
            }
        }
        if reasons.is_empty() {
            reasons.push(
                "no combination of the matching devices meets all constraints together".to_owned(),
            );
        }
        reasons
    }

    /// The values of a constraint's attribute among each covered request's candidates.
    fn values(&self, constraint: &Constraint, candidates: &[Vec<usize>]) -> String {
        use std::fmt::Write as _;
        let mut parts = Vec::new();
        let mut index = 0;
        for request in &self.claim.requests {
            for alternative in &request.alternatives {
                if constraint.covers(&request.name, &alternative.name) {
                    let mut values = BTreeSet::new();
                    let mut lacking = 0;
                    for &device in &candidates[index] {
                        match self.catalog.devices[device]
                            .attributes
                            .get(constraint.attribute())
                        {
                            Some(value) => {
                                values.insert(value.to_string());
                            }
                            None => lacking += 1,
                        }
                    }
                    let shown: Vec<String> = values.iter().take(8).cloned().collect();
                    let more = values.len().saturating_sub(shown.len());
                    let mut part = format!(
                        "{} has [{}]{}",
                        alternative.name,
                        shown.join(", "),
                        if more > 0 {
                            format!(" and {more} more")
                        } else {
                            String::new()
                        }
                    );
                    if lacking > 0 {
                        let _ = write!(
                            part,
                            " ({lacking} device(s) lack {})",
                            constraint.attribute()
                        );
                    }
                    parts.push(part);
                }
                index += 1;
            }
        }
        parts.join("; ")
    }

    /// For each request (or subrequest): the devices that match, and the others with the reason.
    pub fn matches(&self) -> Vec<RequestMatches> {
        let mut out = Vec::new();
        let mut index = 0;
        for request in &self.claim.requests {
            for alternative in &request.alternatives {
                let mut matched = Vec::new();
                let mut rejected: BTreeMap<String, Vec<DeviceId>> = BTreeMap::new();
                for (device, verdict) in self.catalog.devices.iter().zip(&self.verdicts[index]) {
                    match verdict {
                        Ok(()) => matched.push(device.id.clone()),
                        Err(reason) => rejected
                            .entry(reason.clone())
                            .or_default()
                            .push(device.id.clone()),
                    }
                }
                out.push(RequestMatches {
                    request: alternative.name.clone(),
                    class: alternative.class.clone(),
                    matched,
                    rejected,
                });
                index += 1;
            }
        }
        out
    }

    /// The claim's constraints, described.
    pub fn constraints(&self) -> Vec<String> {
        self.claim
            .constraints
            .iter()
            .map(Constraint::describe)
            .collect()
    }
}

/// The devices a request (or subrequest) selects.
#[derive(Debug)]
pub struct RequestMatches {
    /// `request` or `request/subrequest`.
    pub request: String,
    /// Its DeviceClass.
    pub class: String,
    /// Devices its class and selectors accept.
    pub matched: Vec<DeviceId>,
    /// The others, grouped by the reason.
    pub rejected: BTreeMap<String, Vec<DeviceId>>,
}

/// `knd explain`'s text: per request the matching devices and the rejected ones by reason, the
/// constraints, and the allocation or why there is none. Returns the text and whether the claim
/// can be allocated.
pub fn explain(evaluated: &Evaluated<'_>) -> (String, bool) {
    use std::fmt::Write as _;
    let mut text = format!("claim {}\n", evaluated.claim.name);
    let list = |ids: &[DeviceId]| {
        let shown: Vec<String> = ids.iter().take(4).map(ToString::to_string).collect();
        let more = ids.len().saturating_sub(shown.len());
        if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    };
    let total = evaluated.catalog.devices.len();
    for request in evaluated.matches() {
        let _ = writeln!(
            text,
            "  request {} (class {}): {} of {total} devices match{}",
            request.request,
            request.class,
            request.matched.len(),
            if request.matched.is_empty() {
                String::new()
            } else {
                format!(": {}", list(&request.matched))
            }
        );
        for (reason, ids) in &request.rejected {
            let _ = writeln!(text, "    {} rejected: {reason}: {}", ids.len(), list(ids));
        }
    }
    for constraint in evaluated.constraints() {
        let _ = writeln!(text, "  constraint {constraint}");
    }
    let outcome = evaluated.allocate(&HashSet::new());
    match &outcome {
        Ok(allocation) => {
            let node = allocation.node.as_deref().unwrap_or("any node");
            let _ = writeln!(text, "allocatable on {node}:");
            for ((request, device), consumed) in allocation.results.iter().zip(&allocation.consumed)
            {
                let share: Vec<String> = consumed
                    .iter()
                    .map(|(name, amount)| {
                        format!("{name} {}", crate::model::quantity::format(*amount))
                    })
                    .collect();
                if share.is_empty() {
                    let _ = writeln!(text, "  {request}: {device}");
                } else {
                    let _ = writeln!(
                        text,
                        "  {request}: {device} (a share: {})",
                        share.join(", ")
                    );
                }
            }
        }
        Err(failures) => {
            let _ = writeln!(text, "NOT allocatable:");
            for failure in failures {
                let node = failure.node.as_deref().unwrap_or("any node");
                for reason in &failure.reasons {
                    let _ = writeln!(text, "  on {node}: {reason}");
                }
            }
        }
    }
    (text, outcome.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_documents_are_named_not_panics() {
        let cases = [
            ("{", "document 1: not YAML"),
            ("- 1\n", "document 1: no `kind`"),
            (
                "kind: ResourceSlice\nspec: 3\n",
                "document 1: ResourceSlice (unnamed)",
            ),
            ("kind: List\nitems: 3\n", "document 1: List without items"),
            (
                "---\nkind: DeviceClass\nmetadata: {name: a}\n---\nkind: Pod\n",
                "document 2: kind Pod",
            ),
            (
                "kind: ResourceClaimTemplate\nmetadata: {name: t}\nspec: {spec: {devices: {requests: 7}}}\n",
                "document 1: ResourceClaimTemplate t",
            ),
        ];
        for (text, expected) in cases {
            let err = Documents::parse(text, "in.yaml").unwrap_err().to_string();
            assert!(err.starts_with("in.yaml: "), "{err}");
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        // Empty documents are skipped; a List's items are read.
        let documents = Documents::parse(
            "---\n---\nkind: DeviceClassList\nitems:\n- kind: DeviceClass\n  metadata: {name: x}\n",
            "in.yaml",
        )
        .unwrap();
        assert_eq!(documents.classes.len(), 1);
    }

    #[test]
    fn malformed_claims_are_named() {
        let claim = |value: serde_json::Value| -> String {
            let spec: DeviceClaim = serde_json::from_value(value).unwrap();
            Claim::compile("c", &spec).unwrap_err().to_string()
        };
        assert_eq!(claim(serde_json::json!({})), "claim c: no requests");
        assert!(
            claim(serde_json::json!({"requests": [{"name": "a"}]}))
                .contains("request a needs exactly one of `exactly` and `firstAvailable`")
        );
        assert!(
            claim(serde_json::json!({"requests": [{"name": "a", "exactly": {"deviceClassName": "x", "allocationMode": "Some"}}]}))
                .contains("allocationMode Some is neither ExactCount nor All")
        );
        assert!(
            claim(
                serde_json::json!({"requests": [{"name": "a", "exactly": {"deviceClassName": "x"}}],
                "constraints": [{"matchAttribute": "a/b", "distinctAttribute": "a/c"}]})
            )
            .contains("constraint 1 needs exactly one of matchAttribute and distinctAttribute")
        );
        assert!(
            claim(
                serde_json::json!({"requests": [{"name": "a", "exactly": {"deviceClassName": "x"}}],
                "constraints": [{"requests": ["b"], "matchAttribute": "a/b"}]})
            )
            .contains("constraint 1 names request b, which the claim does not have")
        );
    }
}
