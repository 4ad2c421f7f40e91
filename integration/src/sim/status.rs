//! Status tables: `kubectl get`-style rendering of a cluster's status. Pure.

use super::control::ClusterStatus;

/// Formats the status like `kubectl get po,sts,svc,pvc`.
pub fn render_table(s: &ClusterStatus) -> String {
    let mut out = String::new();
    let mut rows = vec![vec![
        "NAME".to_string(),
        "READY".into(),
        "STATUS".into(),
        "RESTARTS".into(),
        "AGE".into(),
        "IP".into(),
    ]];
    for p in &s.pods {
        rows.push(vec![
            format!("pod/{}", p.name),
            format!("{}/1", u8::from(p.ready)),
            p.phase.clone(),
            p.restarts.to_string(),
            fmt_age(p.age_s),
            p.ip.to_string(),
        ]);
    }
    out.push_str(&columns(&rows));
    out.push('\n');
    out.push_str(&columns(&[
        vec!["NAME".into(), "READY".into(), "AGE".into()],
        vec![
            format!("statefulset.apps/{}", s.statefulset),
            format!("{}/{}", s.ready_replicas, s.replicas),
            fmt_age(s.age_s),
        ],
    ]));
    out.push('\n');
    let mut rows = vec![vec![
        "NAME".to_string(),
        "TYPE".into(),
        "CLUSTER-IP".into(),
        "EXTERNAL-IP".into(),
        "PORT(S)".into(),
        "AGE".into(),
    ]];
    for svc in &s.services {
        rows.push(vec![
            format!("service/{}", svc.name),
            svc.type_.clone(),
            svc.cluster_ip
                .map_or_else(|| "None".into(), |ip| ip.to_string()),
            "<none>".into(),
            svc.ports.join(","),
            fmt_age(s.age_s),
        ]);
    }
    out.push_str(&columns(&rows));
    out.push('\n');
    let mut rows = vec![vec![
        "NAME".to_string(),
        "STATUS".into(),
        "VOLUME".into(),
        "CAPACITY".into(),
        "ACCESS MODES".into(),
        "AGE".into(),
    ]];
    for c in &s.claims {
        rows.push(vec![
            format!("persistentvolumeclaim/{}", c.name),
            "Bound".into(),
            c.path.display().to_string(),
            c.capacity.clone(),
            c.access_modes.clone(),
            fmt_age(c.age_s),
        ]);
    }
    out.push_str(&columns(&rows));
    out
}

fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn fmt_age(secs: f64) -> String {
    let s = secs as u64;
    if s < 120 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::sim::control::{ClaimStatus, PodStatus, ServiceStatus};

    fn status() -> ClusterStatus {
        ClusterStatus {
            name: "t".into(),
            namespace: "default".into(),
            statefulset: "tally".into(),
            service_name: "tally-headless".into(),
            replicas: 2,
            ready_replicas: 1,
            pod_management_policy: "Parallel".into(),
            current_revision: "tally-1".into(),
            update_revision: "tally-1".into(),
            pods: vec![
                PodStatus {
                    name: "tally-0".into(),
                    ordinal: 0,
                    ip: Ipv4Addr::new(10, 244, 1, 2),
                    ready: true,
                    phase: "Running".into(),
                    restarts: 0,
                    revision: "tally-1".into(),
                    pid: Some(42),
                    age_s: 61.0,
                },
                PodStatus {
                    name: "tally-1".into(),
                    ordinal: 1,
                    ip: Ipv4Addr::new(10, 244, 1, 3),
                    ready: false,
                    phase: "CrashLoopBackOff".into(),
                    restarts: 3,
                    revision: "tally-1".into(),
                    pid: None,
                    age_s: 3700.0,
                },
            ],
            services: vec![ServiceStatus {
                name: "tally-headless".into(),
                type_: "ClusterIP".into(),
                cluster_ip: None,
                ports: vec!["8080/TCP".into()],
                ready_endpoints: vec![],
            }],
            claims: vec![ClaimStatus {
                name: "data-tally-0".into(),
                path: "/v/data-tally-0".into(),
                capacity: "1Gi".into(),
                access_modes: "RWO".into(),
                age_s: 130.0,
            }],
            client_service: None,
            client_netns: "tsim-t-client".into(),
            domain: "cluster.local".into(),
            age_s: 5.0,
        }
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(fmt_age(0.4), "0s");
        assert_eq!(fmt_age(119.9), "119s");
        assert_eq!(fmt_age(130.0), "2m10s");
        assert_eq!(fmt_age(3700.0), "1h1m");
    }

    #[test]
    fn the_table_has_aligned_columns_for_every_kind() {
        let t = render_table(&status());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "NAME          READY   STATUS             RESTARTS   AGE    IP"
        );
        assert_eq!(
            lines[1],
            "pod/tally-0   1/1     Running            0          61s    10.244.1.2"
        );
        assert_eq!(
            lines[2],
            "pod/tally-1   0/1     CrashLoopBackOff   3          1h1m   10.244.1.3"
        );
        assert!(t.contains("statefulset.apps/tally   1/2     5s"), "{t}");
        assert!(
            t.contains(
                "service/tally-headless   ClusterIP   None         <none>        8080/TCP   5s"
            ),
            "{t}"
        );
        assert!(
            t.contains("persistentvolumeclaim/data-tally-0   Bound    /v/data-tally-0   1Gi        RWO            2m10s"),
            "{t}"
        );
    }
}
