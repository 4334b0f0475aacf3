//! Who a request comes from and what it may do, as the real API server decides it: bearer
//! tokens name knd's service account on a node (a projected token carries the node's name),
//! RBAC rules come from the ClusterRole knd ships (`deploy/kubernetes/rbac.yaml`), so every test
//! that talks to the fake also checks that role; since 1.36 a write of `status.devices` also
//! needs the synthetic subresource `resourceclaims/driver` with a node-aware verb.

use std::sync::LazyLock;

use axum::http::Method;
use serde::Deserialize;

/// The bearer token the fake accepts: knd's service account on node [`NODE`]. A token
/// `<TOKEN>.<node>` is the same account on another node.
pub const TOKEN: &str = "knd-test-token";
/// The node [`TOKEN`] is bound to.
pub const NODE: &str = "node-1";
/// The user knd's service account authenticates as.
pub(super) const USER: &str = "system:serviceaccount:knd-system:knd";
/// The bearer token of a cluster administrator (who may do anything; tests play other drivers
/// and the scheduler with it).
pub const ADMIN_TOKEN: &str = "knd-test-cluster-admin";

/// Which API server the fake plays, for the rules that differ between releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Release {
    /// 1.34 and 1.35: `resourceclaims/status` alone allows writing `status.devices`.
    V1_34,
    /// 1.36 on (`DRAResourceClaimGranularStatusAuthorization`, beta, on by default): the
    /// writer also needs `resourceclaims/driver`, named by the driver, with
    /// `associated-node:<verb>` (its node is the claim's) or `arbitrary-node:<verb>`.
    #[default]
    V1_36,
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Caller {
    /// The user name.
    pub(super) user: String,
    /// `authentication.kubernetes.io/node-name` of its token.
    pub(super) node: Option<String>,
    /// A cluster administrator: every request is allowed.
    pub(super) admin: bool,
}

impl Caller {
    /// The caller a bearer token names, if the token is one the fake issued.
    pub(super) fn of_token(token: &str) -> Option<Self> {
        if token == ADMIN_TOKEN {
            return Some(Self {
                user: "kubernetes-admin".to_owned(),
                node: None,
                admin: true,
            });
        }
        let node = match token.strip_prefix(TOKEN)? {
            "" => NODE,
            rest => rest.strip_prefix('.').filter(|n| !n.is_empty())?,
        };
        Some(Self {
            user: USER.to_owned(),
            node: Some(node.to_owned()),
            admin: false,
        })
    }
}

/// One RBAC policy rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Rule {
    #[serde(default)]
    api_groups: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
    verbs: Vec<String>,
}

/// What a request asks to do, as the authorizer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Attributes {
    /// The verb (`get`, `list`, `create`, `patch`, `associated-node:patch` …).
    pub(super) verb: String,
    /// The API group (`""` for the core group).
    pub(super) group: String,
    /// `resource` or `resource/subresource`.
    pub(super) resource: String,
    /// The object's name, when the request names one.
    pub(super) name: Option<String>,
}

impl Rule {
    fn allows(&self, request: &Attributes) -> bool {
        let any = |list: &[String], value: &str| list.iter().any(|v| v == "*" || v == value);
        any(&self.api_groups, &request.group)
            && any(&self.resources, &request.resource)
            && any(&self.verbs, &request.verb)
            && (self.resource_names.is_empty()
                || request
                    .name
                    .as_deref()
                    .is_some_and(|n| self.resource_names.iter().any(|r| r == n)))
    }
}

/// The rules of the ClusterRole `knd` in the shipped manifests.
pub(super) static KND_RULES: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    #[derive(Deserialize)]
    struct Role {
        kind: String,
        metadata: serde_yaml::Value,
        #[serde(default)]
        rules: Vec<Rule>,
    }
    let text = include_str!("../../../../deploy/kubernetes/rbac.yaml");
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|document| Role::deserialize(document).ok())
        .find(|role| role.kind == "ClusterRole" && role.metadata["name"] == "knd")
        .map(|role| role.rules)
        .expect("deploy/kubernetes/rbac.yaml has the ClusterRole knd")
});

/// Whether `rules` allow `request`.
pub(super) fn allowed(rules: &[Rule], request: &Attributes) -> bool {
    rules.iter().any(|rule| rule.allows(request))
}

/// Whether `caller` may do `request`: an administrator anything, knd what its role allows.
pub(super) fn permits(caller: &Caller, request: &Attributes) -> bool {
    caller.admin || allowed(&KND_RULES, request)
}

/// The attributes of a request to `segments` (the path split at `/`), or `None` for a path
/// that names no resource.
pub(super) fn attributes(method: &Method, segments: &[&str], watch: bool) -> Option<Attributes> {
    let (group, rest) = match segments {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _namespace, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, subresource] => (*resource, Some(*name), Some(*subresource)),
        _ => return None,
    };
    let verb = match (method.as_str(), name) {
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("GET", Some(_)) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", None) => "deletecollection",
        ("DELETE", Some(_)) => "delete",
        _ => return None,
    };
    Some(Attributes {
        verb: verb.to_owned(),
        group: group.to_owned(),
        resource: subresource.map_or_else(|| resource.to_owned(), |s| format!("{resource}/{s}")),
        name: name.map(str::to_owned),
    })
}

/// The message of a 403, as the API server words it.
pub(super) fn forbidden_message(
    caller: &Caller,
    request: &Attributes,
    namespace: Option<&str>,
) -> String {
    let group = if request.group.is_empty() {
        "\"\"".to_owned()
    } else {
        format!("\"{}\"", request.group)
    };
    let (resource, sub) = request
        .resource
        .split_once('/')
        .unwrap_or((&request.resource, ""));
    let object = request
        .name
        .as_deref()
        .map_or_else(|| resource.to_owned(), |n| format!("{resource} \"{n}\""));
    let place = namespace.map_or_else(
        || "at the cluster scope".to_owned(),
        |n| format!("in the namespace \"{n}\""),
    );
    let subresource = if sub.is_empty() {
        String::new()
    } else {
        format!("/{sub}")
    };
    format!(
        "{object} is forbidden: User \"{}\" cannot {} resource \"{resource}{subresource}\" in \
         API group {group} {place}",
        caller.user, request.verb
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(verb: &str, resource: &str, name: Option<&str>) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: "resource.k8s.io".into(),
            resource: resource.into(),
            name: name.map(str::to_owned),
        }
    }

    #[test]
    fn the_shipped_role_allows_what_knd_does_and_nothing_beside() {
        let rules = &*KND_RULES;
        assert!(allowed(rules, &request("create", "resourceslices", None)));
        assert!(allowed(
            rules,
            &request("patch", "resourceclaims/status", Some("c"))
        ));
        assert!(allowed(
            rules,
            &request(
                "associated-node:patch",
                "resourceclaims/driver",
                Some("knd.dev")
            )
        ));
        // Not another driver's entries, not from any node, not the claim itself.
        assert!(!allowed(
            rules,
            &request(
                "associated-node:patch",
                "resourceclaims/driver",
                Some("gpu.nvidia.com")
            )
        ));
        assert!(!allowed(
            rules,
            &request(
                "arbitrary-node:patch",
                "resourceclaims/driver",
                Some("knd.dev")
            )
        ));
        assert!(!allowed(
            rules,
            &request("patch", "resourceclaims", Some("c"))
        ));
        assert!(!allowed(rules, &request("list", "resourceclaims", None)));
        let pods = |verb: &str| Attributes {
            verb: verb.into(),
            group: String::new(),
            resource: "pods".into(),
            name: None,
        };
        assert!(!allowed(rules, &pods("list")));
    }

    #[test]
    fn requests_are_named_as_the_authorizer_names_them() {
        let status = attributes(
            &Method::PATCH,
            &[
                "apis",
                "resource.k8s.io",
                "v1",
                "namespaces",
                "ml",
                "resourceclaims",
                "c",
                "status",
            ],
            false,
        );
        assert_eq!(
            status,
            Some(request("patch", "resourceclaims/status", Some("c")))
        );
        let slices = attributes(
            &Method::GET,
            &["apis", "resource.k8s.io", "v1", "resourceslices"],
            true,
        );
        assert_eq!(slices, Some(request("watch", "resourceslices", None)));
        assert_eq!(attributes(&Method::GET, &["version"], false), None);
        assert_eq!(
            Caller::of_token("knd-test-token.n2")
                .unwrap()
                .node
                .as_deref(),
            Some("n2")
        );
        assert_eq!(
            Caller::of_token("knd-test-token").unwrap().node.as_deref(),
            Some(NODE)
        );
        assert_eq!(Caller::of_token("knd-test-token."), None);
        assert_eq!(Caller::of_token("other"), None);
    }
}
