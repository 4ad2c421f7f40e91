//! Who this pod is: its name, ordinal and the DNS names derived from them.
//!
//! A StatefulSet pod is named `<statefulset>-<ordinal>`; its stable DNS name
//! is `<pod>.<headless>.<namespace>.svc.<domain>` and the SRV record listing
//! all members is `_<port>._tcp.<headless>.<namespace>.svc.<domain>`. Names
//! are built fully qualified (trailing dot) so `ndots:5` search expansion
//! does not multiply the queries.

use crate::config::Config;

/// Why the pod cannot know who it is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "pod name {0:?} does not end in -<ordinal>, so it is not a StatefulSet pod; \
         run it from a StatefulSet, set POD_NAME (e.g. from the Downward API), \
         or leave TALLY_PEERS_SERVICE empty to run standalone"
    )]
    NoOrdinal(String),
}

/// This pod's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Pod name, the first label of its DNS name and its key in the counter.
    pub pod: String,
    /// `Some` when running as a StatefulSet member.
    pub member: Option<Member>,
}

/// The StatefulSet-specific part of an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// StatefulSet name (the pod name without `-<ordinal>`).
    pub statefulset: String,
    /// Ordinal of this pod.
    pub ordinal: u32,
    /// Headless Service governing the StatefulSet.
    pub headless: String,
    /// Namespace of the pod and the Service.
    pub namespace: String,
    /// SRV port name.
    pub port_name: String,
    /// Cluster domain without trailing dot.
    pub domain: String,
}

impl Identity {
    /// Identity from configuration; an ordinal is required only when peers
    /// are configured.
    pub fn from_config(config: &Config) -> Result<Identity, IdentityError> {
        let member = match &config.peers_service {
            None => None,
            Some(headless) => {
                let (statefulset, ordinal) = split_ordinal(&config.pod_name)
                    .ok_or_else(|| IdentityError::NoOrdinal(config.pod_name.clone()))?;
                Some(Member {
                    statefulset: statefulset.to_string(),
                    ordinal,
                    headless: headless.clone(),
                    namespace: config.namespace.clone(),
                    port_name: config.peers_port_name.clone(),
                    domain: config.cluster_domain.clone(),
                })
            }
        };
        Ok(Identity {
            pod: config.pod_name.clone(),
            member,
        })
    }
}

impl Member {
    /// `<headless>.<ns>.svc.<domain>.`
    pub fn service_fqdn(&self) -> String {
        format!("{}.{}.svc.{}.", self.headless, self.namespace, self.domain)
    }

    /// `_<port>._tcp.<headless>.<ns>.svc.<domain>.`, the SRV name listing
    /// every member.
    pub fn srv_name(&self) -> String {
        format!("_{}._tcp.{}", self.port_name, self.service_fqdn())
    }

    /// `<pod>.<headless>.<ns>.svc.<domain>.`
    pub fn pod_fqdn(&self, pod: &str) -> String {
        format!("{pod}.{}", self.service_fqdn())
    }
}

/// `tally-12` → `("tally", 12)`; `None` without a numeric suffix.
pub fn split_ordinal(pod: &str) -> Option<(&str, u32)> {
    let (name, ordinal) = pod.rsplit_once('-')?;
    if name.is_empty() || ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Kubernetes never writes a leading zero ("web-01" is not ordinal 1).
    if ordinal.len() > 1 && ordinal.starts_with('0') {
        return None;
    }
    Some((name, ordinal.parse().ok()?))
}

/// The pod name of an SRV target `<pod>.<headless>.<ns>.svc.<domain>.`.
pub fn pod_of_target(target: &str) -> &str {
    target.split('.').next().unwrap_or(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_parse_like_kubernetes_names_them() {
        let table = [
            ("tally-0", Some(("tally", 0))),
            ("tally-12", Some(("tally", 12))),
            ("my-app-3", Some(("my-app", 3))),
            ("tally", None),
            ("tally-", None),
            ("-3", None),
            ("tally-x", None),
            ("tally-01", None),
            ("tally-99999999999", None),
        ];
        for (name, want) in table {
            assert_eq!(split_ordinal(name), want, "{name}");
        }
    }

    #[test]
    fn dns_names_are_fully_qualified() {
        let m = Member {
            statefulset: "tally".into(),
            ordinal: 1,
            headless: "tally-headless".into(),
            namespace: "prod".into(),
            port_name: "http".into(),
            domain: "cluster.local".into(),
        };
        assert_eq!(
            m.srv_name(),
            "_http._tcp.tally-headless.prod.svc.cluster.local."
        );
        assert_eq!(
            m.pod_fqdn("tally-2"),
            "tally-2.tally-headless.prod.svc.cluster.local."
        );
        assert_eq!(
            pod_of_target("tally-2.tally-headless.prod.svc.cluster.local."),
            "tally-2"
        );
    }
}
