//! `nslookup`, built in: the lab's `kubectl exec tally-0 -- nslookup
//! tally-1.tally-headless` works on an image that has no shell and no
//! dnsutils. The binary answers to the name `nslookup` (busybox-style, the
//! image links `/usr/local/bin/nslookup` to `tally`) and to `tally
//! nslookup`.
//!
//! Like BIND's `nslookup` it reads the pod's `/etc/resolv.conf` (nameservers,
//! search list, `ndots`), asks one nameserver directly (UDP, TCP when the
//! answer is truncated), walks the search list on NXDOMAIN and prints what
//! Debian's `nslookup` prints; [`text`] holds that pure half.

pub mod text;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::{Message, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RecordType};

use crate::discovery::RESOLV_CONF;
use text::{Outcome, Plan, Request};

/// How long one try waits for an answer (BIND's nslookup: 2 s per try, 3 tries).
const TRY_TIMEOUT: Duration = Duration::from_secs(2);
const TRIES: usize = 3;
/// Exit status of a command line nslookup cannot run (sysexits' EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Why a lookup could not start.
#[derive(Debug, thiserror::Error)]
pub enum NslookupError {
    #[error(
        "cannot read the DNS configuration {RESOLV_CONF}: {0} (name the server: nslookup NAME SERVER)"
    )]
    ResolvConf(String),
    #[error("{RESOLV_CONF} lists no nameserver (name the server: nslookup NAME SERVER)")]
    NoNameserver,
    #[error("{0:?} is not a valid DNS name: {1}")]
    Name(String, String),
}

/// Where queries go and how short names are completed.
struct Resolv {
    nameservers: Vec<SocketAddr>,
    search: Vec<String>,
    ndots: usize,
}

impl Resolv {
    /// `/etc/resolv.conf`, read as the service's own resolver reads it; a
    /// `SERVER` argument replaces its nameservers, as in BIND.
    fn load(request: &Request) -> Result<Resolv, NslookupError> {
        let (config, opts) = match hickory_resolver::system_conf::read_system_conf() {
            Ok(found) => found,
            // The search list is optional when the server is named.
            Err(error) if request.server.is_none() => {
                return Err(NslookupError::ResolvConf(error.to_string()));
            }
            Err(_) => Default::default(),
        };
        let mut nameservers: Vec<SocketAddr> = match request.server {
            Some(ip) => vec![SocketAddr::new(ip, request.port)],
            None => config
                .name_servers()
                .iter()
                .map(|ns| SocketAddr::new(ns.ip, request.port))
                .collect(),
        };
        nameservers.dedup();
        if nameservers.is_empty() {
            return Err(NslookupError::NoNameserver);
        }
        Ok(Resolv {
            nameservers,
            search: config
                .search()
                .iter()
                .map(|n| n.to_ascii().trim_end_matches('.').to_string())
                .collect(),
            ndots: opts.ndots,
        })
    }
}

/// Runs `nslookup ARGS` (the arguments after the program name).
pub fn main(args: &[String]) -> ExitCode {
    let request = match text::parse_args(args) {
        Ok(request) => request,
        Err(error) => {
            eprintln!("nslookup: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(&request) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("nslookup: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(request: &Request) -> Result<u8, NslookupError> {
    let resolv = Resolv::load(request)?;
    let plan = text::plan(request);
    let candidates = text::candidates(&plan.name, &resolv.search, resolv.ndots);
    let names = candidates
        .iter()
        .map(|c| Name::from_ascii(c).map_err(|e| NslookupError::Name(c.clone(), e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut outcomes = Vec::new();
    let mut answered_by = None;
    for &record_type in &plan.types {
        let (outcome, server) = search(&resolv.nameservers, &names, record_type);
        answered_by = answered_by.or(server);
        let failed = !matches!(&outcome, Outcome::Answered(m) if m.metadata.response_code == ResponseCode::NoError);
        outcomes.push(outcome);
        if failed {
            break;
        }
    }
    let types = &plan.types[..outcomes.len()];
    let (body, code) = text::render(&request.name, types, &outcomes);
    let mut stdout = std::io::stdout().lock();
    let header = match (answered_by, &plan) {
        (Some(server), Plan { header: true, .. }) => text::header(server),
        _ => String::new(),
    };
    // A closed stdout (`| head`) is not worth a panic.
    let _ = stdout.write_all(header.as_bytes());
    let _ = stdout.write_all(body.as_bytes());
    Ok(code)
}

/// Walks the candidate names until an answer that is not NXDOMAIN; returns
/// the last answer and the server that gave it.
fn search(
    servers: &[SocketAddr],
    names: &[Name],
    record_type: RecordType,
) -> (Outcome, Option<SocketAddr>) {
    let mut last = (Outcome::NoServer, None);
    for name in names {
        let Some((message, server)) = ask_any(servers, name, record_type) else {
            return (Outcome::NoServer, last.1);
        };
        let nxdomain = message.metadata.response_code == ResponseCode::NXDomain;
        last = (Outcome::Answered(message), Some(server));
        if !nxdomain {
            break;
        }
    }
    last
}

/// The first nameserver that answers, each tried [`TRIES`] times.
fn ask_any(
    servers: &[SocketAddr],
    name: &Name,
    record_type: RecordType,
) -> Option<(Message, SocketAddr)> {
    for _ in 0..TRIES {
        for &server in servers {
            if let Ok(message) = exchange(server, name, record_type) {
                return Some((message, server));
            }
        }
    }
    None
}

fn query(name: &Name, record_type: RecordType) -> Result<(u16, Vec<u8>), std::io::Error> {
    let mut id = [0u8; 2];
    getrandom::fill(&mut id).map_err(|e| std::io::Error::other(e.to_string()))?;
    let id = u16::from_be_bytes(id);
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name.clone(), record_type));
    let bytes = message
        .to_vec()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok((id, bytes))
}

/// One question to one server: UDP, then TCP when the answer was truncated.
fn exchange(
    server: SocketAddr,
    name: &Name,
    record_type: RecordType,
) -> Result<Message, std::io::Error> {
    let (id, packet) = query(name, record_type)?;
    let local: IpAddr = match server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((local, 0))?;
    socket.connect(server)?;
    socket.send(&packet)?;
    let deadline = Instant::now() + TRY_TIMEOUT;
    let mut buf = vec![0u8; 65535];
    let message = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        socket.set_read_timeout(Some(left))?;
        let n = socket.recv(&mut buf)?;
        // Ignore strays (an answer to an earlier try, garbage).
        match Message::from_vec(&buf[..n]) {
            Ok(m) if m.metadata.id == id => break m,
            _ => continue,
        }
    };
    if !message.metadata.truncation {
        return Ok(message);
    }
    let mut stream = TcpStream::connect_timeout(&server, TRY_TIMEOUT)?;
    stream.set_read_timeout(Some(TRY_TIMEOUT))?;
    stream.set_write_timeout(Some(TRY_TIMEOUT))?;
    let length = u16::try_from(packet.len()).map_err(std::io::Error::other)?;
    stream.write_all(&length.to_be_bytes())?;
    stream.write_all(&packet)?;
    let mut length = [0u8; 2];
    stream.read_exact(&mut length)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut answer)?;
    Message::from_vec(&answer).map_err(|e| std::io::Error::other(e.to_string()))
}
