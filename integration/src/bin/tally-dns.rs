//! A cluster DNS server for benchmarks and manual runs outside the
//! simulator: publishes one headless Service `tally-headless` in namespace
//! `default` (SRV `_http._tcp…` plus A records, as CoreDNS does) listing the
//! pods given on the command line.
//!
//! `tally-dns --listen 127.0.77.2:5353 tally-0=127.0.77.10:8080 tally-1=…`

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tally_integration::harness::ClusterDns;

#[derive(Parser)]
#[command(about = "Serve a headless Service's DNS records for tally pods")]
struct Args {
    /// Address to serve DNS on (UDP and TCP).
    #[arg(long)]
    listen: SocketAddr,
    /// Pods as NAME=IP:PORT.
    pods: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let SocketAddr::V4(listen) = args.listen else {
        bail!("--listen must be an IPv4 address");
    };
    let mut pods = Vec::new();
    for spec in &args.pods {
        let (name, addr) = spec
            .split_once('=')
            .with_context(|| format!("{spec:?} is not NAME=IP:PORT"))?;
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("{addr:?} is not IP:PORT"))?;
        pods.push((name.to_string(), addr));
    }
    let dns = ClusterDns::start_on(*listen.ip(), listen.port()).await?;
    let records: Vec<(&str, SocketAddr)> = pods.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    dns.publish(&records);
    println!("serving {} pod(s) on {}", records.len(), dns.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
