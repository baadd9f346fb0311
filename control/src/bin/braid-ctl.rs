//! `braid-ctl`: an operator's command line for the control servers.
//!
//! ```sh
//! braid-ctl --control http://127.0.0.1:7100 drain 201     # its viewers move, no new ones
//!                                                         # (BRAID_OPERATOR_TOKEN set)
//! braid-ctl --control http://127.0.0.1:7100 undrain 201
//! braid-ctl --control http://127.0.0.1:7100 status
//! braid-ctl token --secret S --stream 1 --client 42 --ttl 3600
//! braid-ctl dev-certs --dir certs entry1 entry2 set1 edge1   # a CA and node certificates
//! ```
//! Drains go to every control server given (they share no state); status asks the first.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

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
                eprintln!("braid-ctl: no control server took it");
                return ExitCode::FAILURE;
            }
            println!(
                "node {node} {} on {ok} of {} control servers",
                if drain { "draining" } else { "serving" },
                cli.controls.len()
            );
            ExitCode::SUCCESS
        }
    }
}
