//! A ResourceClaim as the driver reads it — its UID, the pods it is reserved for, and its
//! allocation (devices and opaque configs) — converted from the API object at the `k8s` edge.

/// A claim: what prepare, alignment and release need of the API object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claim {
    /// `metadata.uid`.
    pub uid: String,
    /// `status.reservedFor`.
    pub reserved_for: Vec<Reservation>,
    /// `status.allocation.devices`, when the claim is allocated.
    pub allocation: Option<Allocation>,
}

/// One consumer the claim is reserved for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The consumer's resource (`pods`).
    pub resource: String,
    /// Its name.
    pub name: String,
    /// Its UID.
    pub uid: String,
}

/// The devices allocated to a claim and the configuration that goes with them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocation {
    /// Every allocated device, of every driver.
    pub results: Vec<AllocatedDevice>,
    /// The configs, in the order of `config[]` (an error names `config[i]`).
    pub configs: Vec<AllocationConfig>,
}

/// One allocated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedDevice {
    /// The request (`main` or `main/sub`).
    pub request: String,
    /// The driver.
    pub driver: String,
    /// The pool.
    pub pool: String,
    /// The device.
    pub device: String,
    /// `adminAccess`: the request asked for access to a device that may be in use by others.
    pub admin_access: bool,
    /// A share of a device that allows several allocations (`shareID` set), with what it
    /// consumes; `Err` names what in the allocation result is malformed.
    pub share: Option<Result<Share, String>>,
}

/// One share of a device allocated to several claims (consumable capacity, KEP-5075).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// `shareID`: a UUID the scheduler gave this allocation.
    pub id: String,
    /// `consumedCapacity.bandwidth`, bits per second (`None`: the result names no bandwidth).
    pub bandwidth: Option<u64>,
}

impl Share {
    /// The share from an allocation result's `shareID` and its consumed `bandwidth` quantity,
    /// or what is wrong with them.
    pub fn parse(id: &str, bandwidth: Option<&str>) -> Result<Self, String> {
        let uuid = id.len() == 36
            && id.char_indices().all(|(i, c)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit() && !c.is_ascii_uppercase()
                }
            });
        if !uuid {
            return Err(format!("shareID {id:?} is not a lowercase UUID"));
        }
        let bandwidth = bandwidth
            .map(|q| {
                super::quantity::parse(q).map_err(|e| format!("consumedCapacity.bandwidth: {e}"))
            })
            .transpose()?;
        Ok(Self {
            id: id.to_owned(),
            bandwidth,
        })
    }
}

/// One entry of `config[]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationConfig {
    /// From the claim (else from the class: class configs apply first).
    pub from_claim: bool,
    /// The requests it applies to (`None`: the whole claim).
    pub requests: Option<Vec<String>>,
    /// The opaque config, when it is one: (driver, parameters).
    pub opaque: Option<(String, serde_json::Value)>,
}

impl Claim {
    /// Whether the claim is reserved for the pod with UID `pod_uid`.
    pub fn is_reserved_for(&self, pod_uid: &str) -> bool {
        self.reserved_for.iter().any(|r| r.uid == pod_uid)
    }

    /// The pods it is reserved for.
    pub fn pods(&self) -> impl Iterator<Item = &Reservation> {
        self.reserved_for.iter().filter(|r| r.resource == "pods")
    }
}
