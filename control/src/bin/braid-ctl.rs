//! `braid-ctl`: an operator's command line for the control servers.
//!
//! ```sh
//! braid-ctl --control http://127.0.0.1:7100 drain 201     # its viewers move, no new ones
//!                                                         # (BRAID_OPERATOR_TOKEN set)
//! braid-ctl --control http://127.0.0.1:7100 undrain 201
//! braid-ctl --control http://127.0.0.1:7100 status
//! braid-ctl token --secret S --stream 1 --client 42 --ttl 3600
//! braid-ctl dev-certs --dir certs entry1 entry2 set1 edge1   # a CA and node certificates
//! braid-ctl rolling-restart --exec 'ssh "$BRAID_ADDR_HOST" systemctl restart braid-reflector@edge'
//! ```
//! Drains go to every control server given (they share no state); status asks the first.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use braid_core::token::{Claims, Signer};
use braid_core::{ClientId, StreamId};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "braid-ctl", version, about = "Operate Braid control servers")]
struct Cli {
    /// Control servers (repeatable).
    #[arg(
        long = "control",
        env = "BRAID_CONTROL",
        default_value = "http://127.0.0.1:7100",
        value_delimiter = ','
    )]
    controls: Vec<String>,
    /// The control servers' operator token (drain, undrain).
    #[arg(
        long,
        env = "BRAID_OPERATOR_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    operator_token: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Drain an edge: its viewers are told to move and no new viewer is sent to it.
    Drain {
        /// The edge's node id.
        node: u64,
    },
    /// Put a drained edge back in service.
    Undrain {
        /// The edge's node id.
        node: u64,
    },
    /// Print the first control server's status (JSON).
    Status,
    /// Restart every live edge, one at a time, without losing a viewer's packet: drain it
    /// (its viewers move to the other set), wait until it has no viewer, run `--exec`,
    /// wait until it reports again, undrain it, go on to the next.
    RollingRestart {
        /// The command that restarts one edge, run with `sh -c` and the edge in its
        /// environment: BRAID_NODE (id), BRAID_ADDR (IP:PORT), BRAID_ADDR_HOST (IP). It
        /// must exit 0 once the restart is under way.
        #[arg(long)]
        exec: String,
        /// Most seconds to wait for a drained edge's viewers to leave.
        #[arg(long, default_value_t = 60)]
        drain_secs: u64,
        /// Most seconds to wait for a restarted edge to report again.
        #[arg(long, default_value_t = 60)]
        up_secs: u64,
    },
    /// Make a viewer token.
    Token {
        /// The token secret the control servers and edges check with.
        #[arg(long, env = "BRAID_TOKEN_SECRET")]
        secret: String,
        /// Stream id.
        #[arg(long)]
        stream: u32,
        /// Viewer id.
        #[arg(long)]
        client: u64,
        /// Seconds the token is good for.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Make development TLS certificates: a CA (`ca.pem`, `ca.key`) and, for each name, a
    /// certificate and key signed by it, for QUIC between nodes (mutual TLS) and to
    /// viewers. Prints each certificate's SHA-256 fingerprint (what `--tls-pin` takes).
    DevCerts {
        /// Directory to write into (created if missing).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Extra names or IP addresses every certificate is valid for (repeatable);
        /// `localhost`, 127.0.0.1 and ::1 are always included.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Node names, one certificate each.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    match cli.cmd {
        Cmd::DevCerts { dir, sans, names } => {
            match braid_net::tls::make_dev_certs(&dir, &names, &sans) {
                Ok(files) => {
                    for f in files
                        .iter()
                        .filter(|f| f.extension().is_some_and(|e| e == "pem"))
                    {
                        match braid_net::tls::fingerprint_file(f) {
                            Ok(fp) => println!("{}  sha256 {fp}", f.display()),
                            Err(e) => {
                                eprintln!("braid-ctl: {e:#}");
                                return ExitCode::FAILURE;
                            }
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("braid-ctl: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Token {
            secret,
            stream,
            client,
            ttl,
        } => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            println!(
                "{}",
                Signer::new(&secret).sign(&Claims {
                    stream: StreamId(stream),
                    client: ClientId(client),
                    expires: now + ttl,
                })
            );
            ExitCode::SUCCESS
        }
        Cmd::Status => {
            let url = format!("{}/v1/status", cli.controls[0].trim_end_matches('/'));
            match agent
                .get(&url)
                .call()
                .and_then(|mut r| r.body_mut().read_to_string())
            {
                Ok(body) => {
                    println!("{body}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("braid-ctl: {url}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Drain { node } | Cmd::Undrain { node } => {
            let drain = matches!(cli.cmd, Cmd::Drain { .. });
            match set_drain(&agent, &cli, node, drain) {
                Ok(ok) => {
                    println!(
                        "node {node} {} on {ok} of {} control servers",
                        if drain { "draining" } else { "serving" },
                        cli.controls.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("braid-ctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::RollingRestart {
            ref exec,
            drain_secs,
            up_secs,
        } => match rolling_restart(
            &agent,
            &cli,
            exec,
            Duration::from_secs(drain_secs),
            Duration::from_secs(up_secs),
        ) {
            Ok(n) => {
                println!("restarted {n} edges, one at a time");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("braid-ctl: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Drains `node` (or puts it back) on every control server; how many took it.
fn set_drain(agent: &ureq::Agent, cli: &Cli, node: u64, drain: bool) -> Result<usize, String> {
    let mut ok = 0;
    for c in &cli.controls {
        let url = format!("{}/v1/drain/{node}", c.trim_end_matches('/'));
        let auth = format!("Bearer {}", cli.operator_token);
        let res = if drain {
            agent.post(&url).header("Authorization", &auth).send_empty()
        } else {
            agent.delete(&url).header("Authorization", &auth).call()
        };
        match res.map(|mut r| {
            (
                r.status().as_u16(),
                r.body_mut().read_to_string().unwrap_or_default(),
            )
        }) {
            Ok((200, _)) => ok += 1,
            Ok((status, body)) => eprintln!("braid-ctl: {c}: {status} {body}"),
            Err(e) => eprintln!("braid-ctl: {c}: {e}"),
        }
    }
    if ok == 0 {
        return Err(format!("node {node}: no control server took it"));
    }
    Ok(ok)
}

/// The nodes a control server knows, from the first that answers.
fn nodes(agent: &ureq::Agent, cli: &Cli) -> Result<Vec<serde_json::Value>, String> {
    let mut errors = Vec::new();
    for c in &cli.controls {
        let url = format!("{}/v1/status", c.trim_end_matches('/'));
        match agent
            .get(&url)
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
        {
            Ok(body) => {
                let v: serde_json::Value =
                    serde_json::from_str(&body).map_err(|e| format!("{url}: {e}"))?;
                return Ok(v["nodes"].as_array().cloned().unwrap_or_default());
            }
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    Err(format!("no control server answered: {}", errors.join("; ")))
}

/// Waits until `ok` holds for edge `node` (polled every 250 ms), or `within` passes.
fn wait_for(
    agent: &ureq::Agent,
    cli: &Cli,
    node: u64,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Ok(list) = nodes(agent, cli) {
            if list
                .iter()
                .any(|n| n["node"].as_u64() == Some(node) && ok(n))
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

fn rolling_restart(
    agent: &ureq::Agent,
    cli: &Cli,
    exec: &str,
    drain_within: Duration,
    up_within: Duration,
) -> Result<usize, String> {
    let mut edges: Vec<(u64, String)> = nodes(agent, cli)?
        .iter()
        .filter(|n| n["role"] == "edge" && n["live"] == true)
        .filter_map(|n| Some((n["node"].as_u64()?, n["addr"].as_str()?.to_owned())))
        .collect();
    edges.sort();
    if edges.is_empty() {
        return Err("no live edge to restart".into());
    }
    for (i, (node, addr)) in edges.iter().enumerate() {
        eprintln!(
            "braid-ctl: edge {node} ({addr}), {} of {}: draining",
            i + 1,
            edges.len()
        );
        set_drain(agent, cli, *node, true)?;
        if !wait_for(agent, cli, *node, drain_within, |n| n["viewers"] == 0) {
            return Err(format!(
                "edge {node} still had viewers after {} s: left drained, stopped",
                drain_within.as_secs()
            ));
        }
        eprintln!("braid-ctl: edge {node} has no viewer: restarting");
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        let status = std::process::Command::new("sh")
            .args(["-c", exec])
            .env("BRAID_NODE", node.to_string())
            .env("BRAID_ADDR", addr)
            .env(
                "BRAID_ADDR_HOST",
                host.trim_matches(|c| c == '[' || c == ']'),
            )
            .status()
            .map_err(|e| format!("running {exec:?}: {e}"))?;
        if !status.success() {
            return Err(format!(
                "edge {node}: {exec:?} failed ({status}): left drained, stopped"
            ));
        }
        // Reported again since the restart: live, and heard from within the last second
        // after at least one report interval.
        std::thread::sleep(Duration::from_millis(1200));
        if !wait_for(agent, cli, *node, up_within, |n| {
            n["live"] == true && n["silent_ms"].as_u64().is_some_and(|s| s < 1000)
        }) {
            return Err(format!(
                "edge {node} did not report within {} s of its restart: left drained, stopped",
                up_within.as_secs()
            ));
        }
        set_drain(agent, cli, *node, false)?;
        eprintln!("braid-ctl: edge {node} serving again");
    }
    Ok(edges.len())
}
