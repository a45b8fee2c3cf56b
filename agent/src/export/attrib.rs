//! Attribution: what a cgroup's path says about what runs in it (a
//! container and its runtime, a Kubernetes pod and its QoS class, a systemd
//! unit), and which cgroups are exported at all (include and exclude globs,
//! a maximum depth).
//!
//! Recognition works on path segments and is inherited: a cgroup below a
//! container's scope (`.../docker-<id>.scope/init.scope`) belongs to that
//! container. Only names of the shapes the runtimes write are recognised,
//! with a 64-hex-digit container id, so an arbitrary `docker-foo.scope` is
//! not taken for a container.

use crate::policy::glob_matches;

/// The attribute keys this module sets, besides the metrics' own.
pub const CGROUP_PATH: &str = "agent.cgroup.path";
pub const WORKLOAD: &str = "agent.workload.name";
pub const SYSTEMD_UNIT: &str = "agent.systemd.unit";
pub const CONTAINER_ID: &str = "container.id";
pub const CONTAINER_RUNTIME: &str = "container.runtime";
pub const POD_UID: &str = "k8s.pod.uid";
pub const POD_QOS: &str = "agent.k8s.pod.qos_class";

/// What a cgroup path says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub container_id: Option<String>,
    pub runtime: Option<&'static str>,
    pub pod_uid: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort`.
    pub qos_class: Option<&'static str>,
    /// The innermost systemd unit (`nginx.service`, `docker-<id>.scope`).
    pub systemd_unit: Option<String>,
}

fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod uid as written in a path: with dashes (cgroupfs driver) or with
/// underscores (systemd driver, where `-` separates slice names).
fn pod_uid(text: &str) -> Option<String> {
    let uid = text.replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    ok.then_some(uid)
}

/// The container id and runtime of one path segment, if it is a
/// container's cgroup (runtimes' monitor cgroups, `*-conmon-*`, are not).
fn container(segment: &str) -> Option<(&'static str, String)> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    const PREFIXES: &[(&str, &str)] = &[
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
    ];
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = name.strip_prefix(prefix) {
            if is_container_id(id) {
                return Some((runtime, id.to_owned()));
            }
        }
    }
    None
}

const QOS: &[(&str, &str)] = &[("burstable", "burstable"), ("besteffort", "besteffort")];

/// Reads what the segments of `path` (relative to the cgroup v2 root or to
/// a watched subtree of it, starting with `/`) say.
#[must_use]
pub fn attribute(path: &str) -> Attribution {
    let mut found = Attribution::default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut in_kubepods = false;
    let mut parent: Option<&str> = None;
    for segment in &segments {
        if let Some((runtime, id)) = container(segment) {
            found.runtime = Some(runtime);
            found.container_id = Some(id);
        } else if is_container_id(segment) {
            // cgroupfs drivers: `/docker/<id>`, and kubelet's
            // `/kubepods/.../pod<uid>/<id>`, whose runtime the path does not say.
            match parent {
                Some("docker") => {
                    found.runtime = Some("docker");
                    found.container_id = Some((*segment).to_owned());
                }
                Some(pod) if in_kubepods && pod.starts_with("pod") => {
                    found.runtime = None;
                    found.container_id = Some((*segment).to_owned());
                }
                _ => {}
            }
        }
        // Kubernetes: `kubepods.slice/kubepods-burstable.slice/
        // kubepods-burstable-pod<uid>.slice` (systemd driver) or
        // `kubepods/burstable/pod<uid>` (cgroupfs driver); guaranteed pods
        // sit directly under kubepods.
        if *segment == "kubepods" || *segment == "kubepods.slice" {
            in_kubepods = true;
            found.qos_class = Some("guaranteed");
        } else if in_kubepods {
            let name = segment.strip_suffix(".slice").unwrap_or(segment);
            let name = name.strip_prefix("kubepods-").unwrap_or(name);
            for (word, class) in QOS {
                if name == *word {
                    found.qos_class = Some(class);
                }
            }
            let name = QOS
                .iter()
                .find_map(|(word, _)| name.strip_prefix(word).and_then(|n| n.strip_prefix('-')))
                .unwrap_or(name);
            if let Some(uid) = name.strip_prefix("pod").and_then(pod_uid) {
                found.pod_uid = Some(uid);
            }
        }
        if [".service", ".scope", ".slice", ".socket", ".mount", ".swap"]
            .iter()
            .any(|suffix| segment.len() > suffix.len() && segment.ends_with(suffix))
        {
            found.systemd_unit = Some((*segment).to_owned());
        }
        parent = Some(segment);
    }
    found
}

impl Attribution {
    /// As attributes, after the path (and workload name).
    pub fn extend(self, attributes: &mut super::metrics::Attributes) {
        if let Some(id) = self.container_id {
            attributes.push((CONTAINER_ID, id));
        }
        if let Some(runtime) = self.runtime {
            attributes.push((CONTAINER_RUNTIME, runtime.to_owned()));
        }
        if let Some(uid) = self.pod_uid {
            attributes.push((POD_UID, uid));
        }
        if let Some(qos) = self.qos_class {
            attributes.push((POD_QOS, qos.to_owned()));
        }
        if let Some(unit) = self.systemd_unit {
            attributes.push((SYSTEMD_UNIT, unit));
        }
    }
}

/// Which cgroups are exported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Path globs (as in policy files); empty: every cgroup.
    pub include: Vec<String>,
    /// Path globs; a cgroup matching one is left out.
    pub exclude: Vec<String>,
    /// The deepest level exported (the root is 0, its children 1).
    pub max_depth: Option<usize>,
}

impl Selection {
    /// Whether the cgroup at `path` (relative to the watched root) is exported.
    #[must_use]
    pub fn selects(&self, path: &str) -> bool {
        let depth = path.split('/').filter(|s| !s.is_empty()).count();
        if self.max_depth.is_some_and(|max| depth > max) {
            return false;
        }
        (self.include.is_empty() || self.include.iter().any(|g| glob_matches(g, path)))
            && !self.exclude.iter().any(|g| glob_matches(g, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e8c2a9b1d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    const UID: &str = "0b5d4a2e-1c3f-4e8a-9b7d-6c5e4f3a2b1c";

    fn at(path: &str) -> Attribution {
        attribute(path)
    }

    #[test]
    fn docker_under_systemd_and_cgroupfs() {
        let a = at(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(a.container_id.as_deref(), Some(ID));
        assert_eq!(a.runtime, Some("docker"));
        assert_eq!(
            a.systemd_unit.as_deref(),
            Some(format!("docker-{ID}.scope").as_str())
        );
        let a = at(&format!("/docker/{ID}"));
        assert_eq!(a.container_id.as_deref(), Some(ID));
        assert_eq!(a.runtime, Some("docker"));
        assert_eq!(a.systemd_unit, None);
        // A cgroup inside the container (cgroup namespaces, systemd in a
        // container) belongs to it.
        let a = at(&format!("/system.slice/docker-{ID}.scope/init.scope"));
        assert_eq!(a.container_id.as_deref(), Some(ID));
        assert_eq!(a.systemd_unit.as_deref(), Some("init.scope"));
        // Not a container: the docker daemon itself, and a name that only
        // looks like one.
        assert_eq!(at("/system.slice/docker.service").container_id, None);
        assert_eq!(at("/system.slice/docker-foo.scope").container_id, None);
    }

    #[test]
    fn containerd_crio_and_podman() {
        let a = at(&format!("/system.slice/containerd-{ID}.scope"));
        assert_eq!(
            (a.runtime, a.container_id.as_deref()),
            (Some("containerd"), Some(ID))
        );
        let a = at(&format!("/system.slice/crio-{ID}.scope"));
        assert_eq!(
            (a.runtime, a.container_id.as_deref()),
            (Some("cri-o"), Some(ID))
        );
        // The conmon monitor is not the container.
        assert_eq!(
            at(&format!("/machine.slice/libpod-conmon-{ID}.scope")).container_id,
            None
        );
        let a = at(&format!("/machine.slice/libpod-{ID}.scope/container"));
        assert_eq!(
            (a.runtime, a.container_id.as_deref()),
            (Some("podman"), Some(ID))
        );
        // Rootless podman, under the user's systemd.
        let a = at(&format!(
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
        ));
        assert_eq!(
            (a.runtime, a.container_id.as_deref()),
            (Some("podman"), Some(ID))
        );
        // Podman with the cgroupfs manager.
        let a = at(&format!("/libpod_parent/libpod-{ID}"));
        assert_eq!(
            (a.runtime, a.container_id.as_deref()),
            (Some("podman"), Some(ID))
        );
    }

    #[test]
    fn kubernetes_pods_under_the_systemd_driver() {
        let underscored = UID.replace('-', "_");
        let a = at(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{underscored}.slice/cri-containerd-{ID}.scope"
        ));
        assert_eq!(a.pod_uid.as_deref(), Some(UID));
        assert_eq!(a.qos_class, Some("burstable"));
        assert_eq!(
            (a.runtime, a.container_id.as_deref()),
            (Some("containerd"), Some(ID))
        );
        let a = at(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/crio-{ID}.scope"
        ));
        assert_eq!(a.qos_class, Some("besteffort"));
        assert_eq!(a.runtime, Some("cri-o"));
        // Guaranteed pods sit directly under kubepods.slice.
        let a = at(&format!(
            "/kubepods.slice/kubepods-pod{underscored}.slice/docker-{ID}.scope"
        ));
        assert_eq!(a.qos_class, Some("guaranteed"));
        assert_eq!(a.pod_uid.as_deref(), Some(UID));
        assert_eq!(a.runtime, Some("docker"));
        // The pod's own cgroup: a pod, no container.
        let a = at(&format!("/kubepods.slice/kubepods-pod{underscored}.slice"));
        assert_eq!((a.pod_uid.as_deref(), a.container_id), (Some(UID), None));
    }

    #[test]
    fn kubernetes_pods_under_the_cgroupfs_driver() {
        let a = at(&format!("/kubepods/burstable/pod{UID}/{ID}"));
        assert_eq!(a.pod_uid.as_deref(), Some(UID));
        assert_eq!(a.qos_class, Some("burstable"));
        assert_eq!(a.container_id.as_deref(), Some(ID));
        // cgroupfs paths do not name the runtime (except CRI-O's).
        assert_eq!(a.runtime, None);
        let a = at(&format!("/kubepods/besteffort/pod{UID}/crio-{ID}"));
        assert_eq!(a.qos_class, Some("besteffort"));
        assert_eq!(a.runtime, Some("cri-o"));
        let a = at(&format!("/kubepods/pod{UID}/{ID}"));
        assert_eq!(a.qos_class, Some("guaranteed"));
        assert_eq!(a.pod_uid.as_deref(), Some(UID));
        assert_eq!(at("/kubepods/burstable").pod_uid, None);
    }

    #[test]
    fn systemd_units_and_plain_paths() {
        let a = at("/system.slice/nginx.service");
        assert_eq!(a.systemd_unit.as_deref(), Some("nginx.service"));
        assert_eq!(a.container_id, None);
        let a = at("/user.slice/user-1000.slice/session-3.scope");
        assert_eq!(a.systemd_unit.as_deref(), Some("session-3.scope"));
        assert_eq!(at("/"), Attribution::default());
        assert_eq!(at("/agent/web"), Attribution::default());
        // Outside kubepods, a "pod..." name is nothing special.
        assert_eq!(at(&format!("/pod{UID}")).pod_uid, None);
    }

    #[test]
    fn selection_by_globs_and_depth() {
        let all = Selection::default();
        assert!(all.selects("/") && all.selects("/a/b/c/d"));
        let shallow = Selection {
            max_depth: Some(1),
            ..Selection::default()
        };
        assert!(shallow.selects("/") && shallow.selects("/a"));
        assert!(!shallow.selects("/a/b"));
        let some = Selection {
            include: vec!["/system.slice/**".into(), "/web".into()],
            exclude: vec!["/system.slice/*.mount".into()],
            max_depth: None,
        };
        assert!(some.selects("/web"));
        assert!(some.selects("/system.slice/nginx.service"));
        assert!(!some.selects("/system.slice/run-user.mount"));
        assert!(!some.selects("/batch"));
        assert!(!some.selects("/"));
    }
}
