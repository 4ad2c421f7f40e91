//! What CoreDNS's `cache` plugin does in front of the `kubernetes` plugin
//! (kubeadm's Corefile: `cache 30`): answers are kept per question for the
//! smallest TTL among their records, capped at the cache's TTL, and served
//! from memory until then, with their TTLs counting down. Positive answers
//! and negative ones (NXDOMAIN, and NODATA with the SOA in Authority) alike:
//! so for up to 30 s a new pod is missing from its siblings' SRV answers,
//! and a gone pod is still in them. Errors (FORMERR, NOTIMP, REFUSED) are
//! not cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};

/// The cache of one DNS server.
#[derive(Debug)]
pub struct Cache {
    /// The most a answer is kept (`cache 30`: 30 s).
    max_ttl: Duration,
    /// Answers by question (lower-case name, type, class), with when they
    /// were stored and for how long they are served.
    entries: Mutex<HashMap<(String, RecordType, DNSClass), Stored>>,
}

#[derive(Debug)]
struct Stored {
    at: Instant,
    ttl: Duration,
    response: Message,
}

impl Cache {
    /// A cache that keeps answers at most `max_ttl`.
    pub fn new(max_ttl: Duration) -> Cache {
        Cache {
            max_ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The answer to `request`: from the cache while fresh, else from
    /// `fresh` (the zone), stored if cacheable.
    pub fn answer(
        &self,
        request: &Message,
        now: Instant,
        fresh: impl FnOnce() -> Message,
    ) -> Message {
        let Some(query) = request.queries.first() else {
            return fresh();
        };
        let key = (
            query.name().to_ascii().to_ascii_lowercase(),
            query.query_type(),
            query.query_class(),
        );
        let mut entries = self.entries.lock().expect("poisoned");
        if let Some(stored) = entries.get(&key) {
            let age = now.saturating_duration_since(stored.at);
            if age < stored.ttl {
                return replay(&stored.response, request, age);
            }
            entries.remove(&key);
        }
        let response = fresh();
        if let Some(ttl) = self.ttl_of(&response) {
            entries.insert(
                key,
                Stored {
                    at: now,
                    ttl,
                    response: response.clone(),
                },
            );
        }
        response
    }

    /// How long `response` may be served from the cache, if at all.
    fn ttl_of(&self, response: &Message) -> Option<Duration> {
        if !matches!(
            response.metadata.response_code,
            ResponseCode::NoError | ResponseCode::NXDomain
        ) {
            return None;
        }
        let least = response
            .answers
            .iter()
            .chain(&response.authorities)
            .map(|r| r.ttl)
            .min()?;
        Some(self.max_ttl.min(Duration::from_secs(u64::from(least)))).filter(|t| !t.is_zero())
    }
}

/// A stored answer for a new request: its id and question, TTLs counted
/// down by the answer's age.
fn replay(stored: &Message, request: &Message, age: Duration) -> Message {
    let mut response = stored.clone();
    response.metadata.id = request.metadata.id;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.queries = request.queries.clone();
    let elapsed = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
    for record in response
        .answers
        .iter_mut()
        .chain(&mut response.authorities)
        .chain(&mut response.additionals)
    {
        record.ttl = record.ttl.saturating_sub(elapsed);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record};
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    fn question(name: &str, id: u16) -> Message {
        let mut q = Message::query();
        q.metadata.id = id;
        q.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        q
    }

    fn answer(request: &Message, ip: Option<Ipv4Addr>, ttl: u32) -> Message {
        let mut r = Message::response(request.metadata.id, request.metadata.op_code);
        r.add_query(request.queries[0].clone());
        let name = request.queries[0].name().clone();
        match ip {
            Some(ip) => r.add_answer(Record::from_rdata(name, ttl, RData::A(A(ip)))),
            None => {
                r.metadata.response_code = ResponseCode::NXDomain;
                let soa = SOA::new(name.clone(), name.clone(), 1, 1, 1, 1, ttl);
                r.add_authority(Record::from_rdata(name, ttl, RData::SOA(soa)))
            }
        };
        r
    }

    fn ips(m: &Message) -> Vec<(Ipv4Addr, u32)> {
        m.answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(a) => Some((a.0, r.ttl)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn positive_answers_are_served_until_the_capped_ttl_with_ttls_counting_down() {
        let cache = Cache::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let old = Ipv4Addr::new(10, 0, 0, 1);
        let new = Ipv4Addr::new(10, 0, 0, 2);
        let q = question("a.example.", 1);
        let first = cache.answer(&q, t0, || answer(&q, Some(old), 60));
        assert_eq!(ips(&first), [(old, 60)]);
        // The zone changed, but the cache still answers the old address,
        // under the new request's id and with the TTL counted down.
        let q2 = question("A.Example.", 2);
        let cached = cache.answer(&q2, t0 + Duration::from_secs(29), || {
            answer(&q2, Some(new), 60)
        });
        assert_eq!(ips(&cached), [(old, 31)]);
        assert_eq!(cached.metadata.id, 2);
        assert_eq!(cached.queries, q2.queries);
        // Capped at 30 s even though the record says 60.
        let later = cache.answer(&q2, t0 + Duration::from_secs(30), || {
            answer(&q2, Some(new), 60)
        });
        assert_eq!(ips(&later), [(new, 60)]);
    }

    #[test]
    fn a_shorter_record_ttl_wins() {
        let cache = Cache::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let q = question("a.example.", 1);
        cache.answer(&q, t0, || answer(&q, Some(Ipv4Addr::LOCALHOST), 5));
        let after = cache.answer(&q, t0 + Duration::from_secs(5), || answer(&q, None, 5));
        assert_eq!(after.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn nxdomain_is_cached_too() {
        let cache = Cache::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let q = question("new.example.", 1);
        cache.answer(&q, t0, || answer(&q, None, 30));
        let still = cache.answer(&q, t0 + Duration::from_secs(10), || {
            answer(&q, Some(Ipv4Addr::LOCALHOST), 30)
        });
        assert_eq!(still.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(still.authorities[0].ttl, 20);
    }

    #[test]
    fn errors_are_not_cached() {
        let cache = Cache::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let q = question("a.example.", 1);
        cache.answer(&q, t0, || {
            let mut r = answer(&q, Some(Ipv4Addr::LOCALHOST), 30);
            r.metadata.response_code = ResponseCode::Refused;
            r
        });
        let next = cache.answer(&q, t0, || answer(&q, None, 30));
        assert_eq!(next.metadata.response_code, ResponseCode::NXDomain);
    }
}
