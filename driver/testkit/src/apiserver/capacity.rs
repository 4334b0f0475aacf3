//! Consumable capacity (KEP-5075) as the API server and the scheduler hold it: a device's
//! `capacity` and `requestPolicy` are validated on every slice write (dropped with
//! `allowMultipleAllocations` before 1.36, where the feature is alpha and off), and an
//! allocation written into a claim may share only a device that allows it, with a UUID
//! `shareID`, and never consume more than is left of the device's capacity (the scheduler's
//! guarantee, checked here because the tests play the scheduler).

use k8s_openapi::api::resource::v1::{CapacityRequestPolicy, Device, ResourceClaim, ResourceSlice};

use super::authz::Release;

/// A quantity's whole value, for comparisons (the tests use whole quantities only).
fn value(text: &str) -> Option<u64> {
    knd::model::quantity::parse(text).ok()
}

/// Before 1.36 the fields are alpha and off: dropped without an error, as the real server
/// drops disabled fields.
pub(super) fn prepare(release: Release, slice: &mut ResourceSlice) {
    if release != Release::V1_34 {
        return;
    }
    for device in slice.spec.devices.iter_mut().flatten() {
        device.allow_multiple_allocations = None;
        for capacity in device.capacity.iter_mut().flatten().map(|(_, c)| c) {
            capacity.request_policy = None;
        }
    }
}

/// A device's capacities: each value a quantity, each request policy with one kind of valid
/// requests, a default among them.
pub(super) fn device_problems(path: &str, device: &Device) -> Vec<String> {
    let mut errors = Vec::new();
    for (name, capacity) in device.capacity.iter().flatten() {
        let at = format!("{path}.capacity[{name}]");
        let Some(total) = value(&capacity.value.0) else {
            errors.push(format!(
                "{at}.value: Invalid value: \"{}\": quantities must match the regular \
                 expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                capacity.value.0
            ));
            continue;
        };
        if let Some(policy) = &capacity.request_policy {
            errors.extend(policy_problems(
                &format!("{at}.requestPolicy"),
                policy,
                total,
            ));
        }
    }
    errors
}

fn policy_problems(at: &str, policy: &CapacityRequestPolicy, total: u64) -> Vec<String> {
    let mut errors = Vec::new();
    let default = policy.default.as_ref().and_then(|q| value(&q.0));
    match (&policy.valid_values, &policy.valid_range) {
        (Some(_), Some(_)) => errors.push(format!(
            "{at}: Invalid value: must not set more than one ValidRequestValues"
        )),
        (Some(values), None) => {
            let parsed: Vec<Option<u64>> = values.iter().map(|q| value(&q.0)).collect();
            if values.len() > 10 {
                errors.push(format!(
                    "{at}.validValues: Too many: {}: must have at most 10 items",
                    values.len()
                ));
            }
            if parsed.iter().any(Option::is_none) || !parsed.windows(2).all(|w| w[0] < w[1]) {
                errors.push(format!(
                    "{at}.validValues: Invalid value: must be sorted in ascending order, without \
                     duplicates"
                ));
            }
            if default.is_none_or(|d| !parsed.contains(&Some(d))) {
                errors.push(format!(
                    "{at}.default: Invalid value: must be defined and be one of validValues"
                ));
            }
        }
        (None, Some(range)) => {
            let min = value(&range.min.0);
            let max = range.max.as_ref().map(|q| value(&q.0));
            let step = range.step.as_ref().map(|q| value(&q.0));
            if min.is_none()
                || max.is_some_and(|m| m.is_none())
                || step.is_some_and(|s| s.is_none_or(|s| s == 0))
            {
                errors.push(format!(
                    "{at}.validRange: Invalid value: min, max and step must be quantities, step \
                     greater than zero"
                ));
            }
            let (min, max) = (min.unwrap_or(0), max.flatten().unwrap_or(total));
            if max < min {
                errors.push(format!(
                    "{at}.validRange.max: Invalid value: must not be less than min"
                ));
            }
            if default.is_none_or(|d| d < min || d > max) {
                errors.push(format!(
                    "{at}.default: Invalid value: must be defined and fall within validRange"
                ));
            }
        }
        (None, None) => {}
    }
    errors
}

/// A claim's allocation against the slices and the other claims: a `shareID` is a UUID and
/// names a share of a device that allows several allocations; `consumedCapacity` is what the
/// share takes, and the device's shares together never exceed its capacity.
pub(super) fn allocation_problems(
    claim: &ResourceClaim,
    slices: &[&ResourceSlice],
    others: &[&ResourceClaim],
) -> Vec<String> {
    let device = |driver: &str, pool: &str, name: &str| {
        slices
            .iter()
            .filter(|s| s.spec.driver == driver && s.spec.pool.name == pool)
            .flat_map(|s| s.spec.devices.iter().flatten())
            .find(|d| d.name == name)
    };
    let results = |claim: &ResourceClaim| -> Vec<k8s_openapi::api::resource::v1::DeviceRequestAllocationResult> {
        claim
            .status
            .as_ref()
            .and_then(|s| s.allocation.as_ref())
            .and_then(|a| a.devices.as_ref())
            .and_then(|d| d.results.clone())
            .unwrap_or_default()
    };
    let mut errors = Vec::new();
    for (i, result) in results(claim).iter().enumerate() {
        let at = format!("status.allocation.devices.results[{i}]");
        let Some(share) = &result.share_id else {
            continue;
        };
        if !is_uuid(share) {
            errors.push(format!(
                "{at}.shareID: Invalid value: \"{share}\": must be a lowercase UUID"
            ));
        }
        let Some(published) = device(&result.driver, &result.pool, &result.device) else {
            continue; // the scheduler would not allocate it; other checks name it
        };
        if published.allow_multiple_allocations != Some(true) {
            errors.push(format!(
                "{at}.shareID: Invalid value: device {} does not allow multiple allocations",
                result.device
            ));
        }
        for (name, consumed) in result.consumed_capacity.iter().flatten() {
            let Some(consumed) = value(&consumed.0) else {
                errors.push(format!(
                    "{at}.consumedCapacity[{name}]: Invalid value: \"{}\"",
                    consumed.0
                ));
                continue;
            };
            let Some(total) = published
                .capacity
                .as_ref()
                .and_then(|c| c.get(name))
                .and_then(|c| value(&c.value.0))
            else {
                errors.push(format!(
                    "{at}.consumedCapacity[{name}]: Invalid value: device {} has no such capacity",
                    result.device
                ));
                continue;
            };
            let taken: u64 = others
                .iter()
                .flat_map(|c| results(c))
                .filter(|r| {
                    r.share_id.is_some()
                        && (r.driver.as_str(), r.pool.as_str(), r.device.as_str())
                            == (
                                result.driver.as_str(),
                                result.pool.as_str(),
                                result.device.as_str(),
                            )
                })
                .filter_map(|r| {
                    r.consumed_capacity
                        .as_ref()?
                        .get(name)
                        .and_then(|q| value(&q.0))
                })
                .sum();
            if taken + consumed > total {
                errors.push(format!(
                    "{at}.consumedCapacity[{name}]: Invalid value: {consumed} would bring device {} \
                     to {} of its {total}",
                    result.device,
                    taken + consumed
                ));
            }
        }
    }
    errors
}

fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_digit() || ('a'..='f').contains(&c)
            }
        })
}
