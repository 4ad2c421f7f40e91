//! The pure half of `nslookup`: its arguments in, the text BIND's
//! `nslookup` (Debian's dnsutils) prints out, and the search-list walk, so
//! all of it is tested without a socket against output recorded from the
//! real tool.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::{RData, RecordType};

/// The DNS port, when the command line names none.
pub const DNS_PORT: u16 = 53;

/// The usage line, for errors and `-h`.
pub const USAGE: &str = "usage: nslookup [-type=A|AAAA|SRV|PTR] [-port=N] NAME [SERVER]";

/// A command line `nslookup` cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("no name to look up (interactive mode is not supported)\n{USAGE}")]
    NoName,
    #[error("query type {0:?} is not supported: use A, AAAA, SRV or PTR\n{USAGE}")]
    Type(String),
    #[error("-port={0:?} is not a port number (1-65535)\n{USAGE}")]
    Port(String),
    #[error("unknown option {0:?}\n{USAGE}")]
    Option(String),
    #[error("server {0:?} is not an IP address (give the nameserver's address)\n{USAGE}")]
    Server(String),
    #[error("unexpected argument {0:?} after NAME and SERVER\n{USAGE}")]
    Extra(String),
}

/// What was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No `-type`: A, then AAAA (an IP address: its PTR record).
    Address,
    /// One record type.
    Only(RecordType),
}

/// One parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The name (or address) as typed; messages quote it this way.
    pub name: String,
    /// The record types to ask for.
    pub kind: Kind,
    /// `SERVER`: ask it instead of the resolv.conf nameservers.
    pub server: Option<IpAddr>,
    /// `-port=N`.
    pub port: u16,
}

/// Parses `nslookup`'s arguments (without the program name), BIND's way:
/// options start with `-` and may come anywhere; `-type`, `-query` and
/// `-querytype` are the same option.
pub fn parse_args(args: &[String]) -> Result<Request, UsageError> {
    let mut kind = Kind::Address;
    let mut port = DNS_PORT;
    let mut positional = Vec::new();
    for arg in args {
        let Some(option) = arg.strip_prefix('-').filter(|o| !o.is_empty()) else {
            positional.push(arg.as_str());
            continue;
        };
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        match key.to_ascii_lowercase().as_str() {
            "type" | "query" | "querytype" | "q" | "t" => {
                let wanted = match value.to_ascii_uppercase().as_str() {
                    "A" => RecordType::A,
                    "AAAA" => RecordType::AAAA,
                    "SRV" => RecordType::SRV,
                    "PTR" => RecordType::PTR,
                    _ => return Err(UsageError::Type(value.to_string())),
                };
                kind = Kind::Only(wanted);
            }
            "port" => {
                port = value
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| UsageError::Port(value.to_string()))?;
            }
            _ => return Err(UsageError::Option(arg.clone())),
        }
    }
    let mut positional = positional.into_iter();
    let name = positional.next().ok_or(UsageError::NoName)?.to_string();
    let server = positional
        .next()
        .map(|s| s.parse().map_err(|_| UsageError::Server(s.to_string())))
        .transpose()?;
    if let Some(extra) = positional.next() {
        return Err(UsageError::Extra(extra.to_string()));
    }
    Ok(Request {
        name,
        kind,
        server,
        port,
    })
}

/// What to send: the name and the record types, in the order they are
/// printed. An IP address is looked up by its reverse name; without
/// `-type` BIND then prints the PTR answer alone, with no `Server:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The name to send (before the search list).
    pub name: String,
    /// One lookup per type.
    pub types: Vec<RecordType>,
    /// Print the `Server:`/`Address:` lines first.
    pub header: bool,
}

/// Plans the lookups for `request`.
pub fn plan(request: &Request) -> Plan {
    let ip = request.name.parse::<IpAddr>().ok();
    match (request.kind, ip) {
        (Kind::Address, Some(ip)) => Plan {
            name: reverse_name(ip),
            types: vec![RecordType::PTR],
            header: false,
        },
        (Kind::Only(RecordType::PTR), Some(ip)) => Plan {
            name: reverse_name(ip),
            types: vec![RecordType::PTR],
            header: true,
        },
        (Kind::Address, None) => Plan {
            name: request.name.clone(),
            types: vec![RecordType::A, RecordType::AAAA],
            header: true,
        },
        (Kind::Only(t), _) => Plan {
            name: request.name.clone(),
            types: vec![t],
            header: true,
        },
    }
}

/// `d.c.b.a.in-addr.arpa.` (or the nibble form under `ip6.arpa.`).
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut name = String::new();
            for byte in v6.octets().iter().rev() {
                name.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            name + "ip6.arpa."
        }
    }
}

/// The fully qualified names to try, in order, as resolv.conf(5) says: a
/// name with a trailing dot is tried alone; one with at least `ndots` dots
/// as it is first, then with each search domain; a shorter one with each
/// search domain first and as it is last. The walk stops at the first
/// answer that is not NXDOMAIN.
pub fn candidates(name: &str, search: &[String], ndots: usize) -> Vec<String> {
    if name.ends_with('.') {
        return vec![name.to_string()];
    }
    let absolute = format!("{name}.");
    let searched: Vec<String> = search
        .iter()
        .map(|domain| format!("{name}.{}.", domain.trim_matches('.')))
        .filter(|candidate| *candidate != absolute)
        .collect();
    if name.matches('.').count() >= ndots {
        std::iter::once(absolute).chain(searched).collect()
    } else {
        searched
            .into_iter()
            .chain(std::iter::once(absolute))
            .collect()
    }
}

/// The answer to one lookup (one record type, after the search list).
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The server answered (any response code).
    Answered(Message),
    /// No server answered.
    NoServer,
}

/// `Server:`/`Address:` lines of the server that answered.
pub fn header(server: SocketAddr) -> String {
    format!(
        "Server:\t\t{ip}\nAddress:\t{ip}#{port}\n\n",
        ip = server.ip(),
        port = server.port()
    )
}

/// BIND's name for a response code.
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

fn bare(name: &str) -> &str {
    name.strip_suffix('.').unwrap_or(name)
}

fn dotted(name: &str) -> String {
    format!("{}.", bare(name))
}

/// Prints the answers to the lookups of `types` (`outcomes[i]` answers
/// `types[i]`) as BIND's `nslookup` does, and the exit status: 1 once a
/// lookup fails (NXDOMAIN, SERVFAIL…, or no server), which ends the output.
/// `typed` is the name as the user typed it; errors quote it that way.
pub fn render(typed: &str, types: &[RecordType], outcomes: &[Outcome]) -> (String, u8) {
    let typed = bare(typed);
    let mut out = String::new();
    let mut said_not_authoritative = false;
    let mut address_lookup_empty = false;
    let address_mode = types == [RecordType::A, RecordType::AAAA];
    for (wanted, outcome) in types.iter().zip(outcomes) {
        let message = match outcome {
            Outcome::Answered(message) => message,
            Outcome::NoServer => {
                out.push_str(";; connection timed out; no servers could be reached\n\n");
                return (out, 1);
            }
        };
        let code = message.metadata.response_code;
        if code != ResponseCode::NoError {
            out.push_str(&format!(
                "** server can't find {typed}: {}\n\n",
                rcode_name(code)
            ));
            return (out, 1);
        }
        let records: Vec<_> = message
            .answers
            .iter()
            .filter(|r| r.record_type() == *wanted || r.record_type() == RecordType::CNAME)
            .collect();
        if records.is_empty() {
            // Without -type, "No answer" means neither A nor AAAA exists.
            if address_mode && *wanted == RecordType::A {
                address_lookup_empty = true;
            } else if !address_mode || address_lookup_empty {
                out.push_str(&format!("*** Can't find {typed}: No answer\n"));
            }
            continue;
        }
        if !message.metadata.authoritative && !said_not_authoritative {
            out.push_str("Non-authoritative answer:\n");
            said_not_authoritative = true;
        }
        for record in records {
            let owner = record.name.to_ascii();
            let owner = bare(&owner);
            let line = match &record.data {
                RData::A(a) => format!("Name:\t{owner}\nAddress: {}\n", a.0),
                RData::AAAA(aaaa) => format!("Name:\t{owner}\nAddress: {}\n", aaaa.0),
                RData::SRV(srv) => format!(
                    "{owner}\tservice = {} {} {} {}\n",
                    srv.priority,
                    srv.weight,
                    srv.port,
                    dotted(&srv.target.to_ascii())
                ),
                RData::PTR(ptr) => format!("{owner}\tname = {}\n", dotted(&ptr.0.to_ascii())),
                RData::CNAME(cname) => format!(
                    "{owner}\tcanonical name = {}\n",
                    dotted(&cname.0.to_ascii())
                ),
                _ => continue,
            };
            out.push_str(&line);
        }
    }
    out.push('\n');
    (out, 0)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_resolver::proto::op::{Message, OpCode};
    use hickory_resolver::proto::rr::rdata::{A, PTR, SRV};
    use hickory_resolver::proto::rr::{Name, Record};

    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    /// An authoritative answer, as the cluster DNS gives.
    fn answer(code: ResponseCode, records: Vec<Record>) -> Outcome {
        let mut m = Message::response(1, OpCode::Query);
        m.metadata.authoritative = true;
        m.metadata.response_code = code;
        m.add_answers(records);
        Outcome::Answered(m)
    }

    fn a(owner: &str, ip: [u8; 4]) -> Record {
        Record::from_rdata(
            name(owner),
            30,
            RData::A(A::from(std::net::Ipv4Addr::from(ip))),
        )
    }

    const SEARCH: [&str; 3] = [
        "default.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
    ];

    fn search() -> Vec<String> {
        SEARCH.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_the_common_forms() {
        assert_eq!(
            parse_args(&args("tally-1.tally-headless")).unwrap(),
            Request {
                name: "tally-1.tally-headless".into(),
                kind: Kind::Address,
                server: None,
                port: 53
            }
        );
        let r = parse_args(&args("-type=srv _peer._tcp.tally-headless 10.96.0.10")).unwrap();
        assert_eq!(r.kind, Kind::Only(RecordType::SRV));
        assert_eq!(r.server, Some("10.96.0.10".parse().unwrap()));
        // Options may follow the name; -query is -type; -port.
        let r = parse_args(&args("tally -query=AAAA 127.0.0.1 -port=5353")).unwrap();
        assert_eq!(r.kind, Kind::Only(RecordType::AAAA));
        assert_eq!((r.port, r.name.as_str()), (5353, "tally"));
        assert_eq!(
            parse_args(&args("-type=PTR 10.244.1.3")).unwrap().kind,
            Kind::Only(RecordType::PTR)
        );
    }

    #[test]
    fn refuses_what_it_cannot_do_and_says_why() {
        assert_eq!(parse_args(&[]), Err(UsageError::NoName));
        assert_eq!(
            parse_args(&args("-type=MX x")),
            Err(UsageError::Type("MX".into()))
        );
        assert_eq!(
            parse_args(&args("-port=0 x")),
            Err(UsageError::Port("0".into()))
        );
        assert_eq!(
            parse_args(&args("-debug x")),
            Err(UsageError::Option("-debug".into()))
        );
        assert_eq!(
            parse_args(&args("x dns.example")),
            Err(UsageError::Server("dns.example".into()))
        );
        assert_eq!(
            parse_args(&args("x 10.96.0.10 y")),
            Err(UsageError::Extra("y".into()))
        );
        let text = UsageError::Type("MX".into()).to_string();
        assert!(text.contains("use A, AAAA, SRV or PTR") && text.contains(USAGE));
    }

    #[test]
    fn search_list_follows_ndots() {
        // Fewer dots than ndots: the search list first, the name alone last.
        assert_eq!(
            candidates("tally-1.tally-headless", &search(), 5),
            vec![
                "tally-1.tally-headless.default.svc.cluster.local.",
                "tally-1.tally-headless.svc.cluster.local.",
                "tally-1.tally-headless.cluster.local.",
                "tally-1.tally-headless.",
            ]
        );
        // Enough dots: as it is first.
        assert_eq!(
            candidates("a.b.c", &search(), 2)[..2],
            ["a.b.c.", "a.b.c.default.svc.cluster.local."]
        );
        // A trailing dot: only the name.
        assert_eq!(
            candidates("example.com.", &search(), 5),
            vec!["example.com."]
        );
        assert_eq!(candidates("x", &[], 1), vec!["x."]);
    }

    #[test]
    fn plans_reverse_lookups_for_addresses() {
        let r = parse_args(&args("10.244.1.3")).unwrap();
        assert_eq!(
            plan(&r),
            Plan {
                name: "3.1.244.10.in-addr.arpa.".into(),
                types: vec![RecordType::PTR],
                header: false
            }
        );
        assert!(plan(&parse_args(&args("-type=PTR 10.244.1.3")).unwrap()).header);
        assert_eq!(
            plan(&parse_args(&args("tally")).unwrap()).types,
            vec![RecordType::A, RecordType::AAAA]
        );
        assert_eq!(
            reverse_name("2001:db8::1".parse().unwrap()),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."
        );
    }

    // The expected texts below are what Debian's nslookup 9.18 printed
    // (`cat -A` checked) against the simulator's cluster DNS.

    #[test]
    fn prints_a_pod_name_like_bind() {
        let server: SocketAddr = "10.96.0.10:53".parse().unwrap();
        let owner = "tally-1.tally-headless.default.svc.cluster.local.";
        let (body, code) = render(
            "tally-1.tally-headless",
            &[RecordType::A, RecordType::AAAA],
            &[
                answer(ResponseCode::NoError, vec![a(owner, [10, 244, 1, 3])]),
                answer(ResponseCode::NoError, vec![]),
            ],
        );
        assert_eq!(
            header(server) + &body,
            "Server:\t\t10.96.0.10\nAddress:\t10.96.0.10#53\n\n\
             Name:\ttally-1.tally-headless.default.svc.cluster.local\nAddress: 10.244.1.3\n\n"
        );
        assert_eq!(code, 0);
    }

    #[test]
    fn prints_every_address_of_a_headless_service() {
        let owner = "tally-headless.default.svc.cluster.local.";
        let (body, _) = render(
            "tally-headless",
            &[RecordType::A, RecordType::AAAA],
            &[
                answer(
                    ResponseCode::NoError,
                    vec![a(owner, [10, 244, 1, 2]), a(owner, [10, 244, 1, 3])],
                ),
                answer(ResponseCode::NoError, vec![]),
            ],
        );
        assert_eq!(
            body,
            "Name:\ttally-headless.default.svc.cluster.local\nAddress: 10.244.1.2\n\
             Name:\ttally-headless.default.svc.cluster.local\nAddress: 10.244.1.3\n\n"
        );
    }

    #[test]
    fn prints_srv_like_bind() {
        let owner = "_http._tcp.tally-headless.default.svc.cluster.local.";
        let srv = |pod: &str| {
            Record::from_rdata(
                name(owner),
                30,
                RData::SRV(SRV::new(
                    0,
                    33,
                    8080,
                    name(&format!("{pod}.tally-headless.default.svc.cluster.local.")),
                )),
            )
        };
        let (body, code) = render(
            "_http._tcp.tally-headless",
            &[RecordType::SRV],
            &[answer(
                ResponseCode::NoError,
                vec![srv("tally-0"), srv("tally-1")],
            )],
        );
        assert_eq!(
            body,
            "_http._tcp.tally-headless.default.svc.cluster.local\tservice = 0 33 8080 tally-0.tally-headless.default.svc.cluster.local.\n\
             _http._tcp.tally-headless.default.svc.cluster.local\tservice = 0 33 8080 tally-1.tally-headless.default.svc.cluster.local.\n\n"
        );
        assert_eq!(code, 0);
    }

    #[test]
    fn nxdomain_names_the_typed_name_and_exits_1() {
        let (body, code) = render(
            "tally-1.tally-nowhere",
            &[RecordType::A, RecordType::AAAA],
            &[answer(ResponseCode::NXDomain, vec![])],
        );
        assert_eq!(
            body,
            "** server can't find tally-1.tally-nowhere: NXDOMAIN\n\n"
        );
        assert_eq!(code, 1);
        let (body, _) = render(
            "example.com.",
            &[RecordType::A],
            &[answer(ResponseCode::ServFail, vec![])],
        );
        assert_eq!(body, "** server can't find example.com: SERVFAIL\n\n");
    }

    #[test]
    fn no_answer_only_when_the_name_has_none_of_the_types() {
        let (body, code) = render(
            "tally-1.tally-headless",
            &[RecordType::AAAA],
            &[answer(ResponseCode::NoError, vec![])],
        );
        assert_eq!(
            (body.as_str(), code),
            ("*** Can't find tally-1.tally-headless: No answer\n\n", 0)
        );
        let (body, _) = render(
            "default.svc.cluster.local",
            &[RecordType::A, RecordType::AAAA],
            &[
                answer(ResponseCode::NoError, vec![]),
                answer(ResponseCode::NoError, vec![]),
            ],
        );
        assert_eq!(
            body,
            "*** Can't find default.svc.cluster.local: No answer\n\n"
        );
    }

    #[test]
    fn ptr_and_non_authoritative_answers() {
        let mut m = Message::response(1, OpCode::Query);
        m.add_answer(Record::from_rdata(
            name("3.1.244.10.in-addr.arpa."),
            30,
            RData::PTR(PTR(name(
                "tally-1.tally-headless.default.svc.cluster.local.",
            ))),
        ));
        let (body, code) = render("10.244.1.3", &[RecordType::PTR], &[Outcome::Answered(m)]);
        assert_eq!(
            body,
            "Non-authoritative answer:\n\
             3.1.244.10.in-addr.arpa\tname = tally-1.tally-headless.default.svc.cluster.local.\n\n"
        );
        assert_eq!(code, 0);
    }

    #[test]
    fn no_server_is_a_failure() {
        let (body, code) = render("x", &[RecordType::A], &[Outcome::NoServer]);
        assert_eq!(
            (body.as_str(), code),
            (
                ";; connection timed out; no servers could be reached\n\n",
                1
            )
        );
    }
}
