//! What every Braid daemon does the same way.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// Loads a daemon's config: flags, and if a config file is named, the file with the flags
/// on top. Only flags actually given (or set through their environment variable)
/// override the file; a flag's default never clobbers a value from the file.
pub fn load_config<C>(args: Vec<OsString>, file: impl Fn(&C) -> Option<&Path>) -> anyhow::Result<C>
where
    C: clap::Parser + DeserializeOwned + serde::Serialize,
{
    use clap::parser::ValueSource;

    let matches = C::command()
        .try_get_matches_from(&args)
        .unwrap_or_else(|e| e.exit());
    let from_flags = C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Some(path) = file(&from_flags).map(Path::to_path_buf) else {
        return Ok(from_flags);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let from_file: C =
        toml::from_str(&text).with_context(|| format!("in config file {}", path.display()))?;
    // Merge field by field through each one's serialized form, so types always agree.
    let mut merged = toml::Table::try_from(&from_file).context("re-reading the config file")?;
    let flags = toml::Table::try_from(&from_flags).context("reading the flags")?;
    for id in matches.ids() {
        let id = id.as_str();
        if matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            // Flags of a flattened group (`--tls-cert`, id `tls_cert`) live in a TOML
            // table (`[tls] cert`).
            let nested = id.split_once('_').filter(|(t, _)| {
                !flags.contains_key(id) && flags.get(*t).is_some_and(toml::Value::is_table)
            });
            let (from, into, key) = match nested {
                Some((table, key)) => {
                    let into = merged
                        .entry(table)
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    match (flags[table].as_table(), into.as_table_mut()) {
                        (Some(f), Some(i)) => (f, i, key),
                        _ => continue,
                    }
                }
                None => (&flags, &mut merged, id),
            };
            match from.get(key) {
                Some(v) => into.insert(key.to_owned(), v.clone()),
                None => into.remove(key),
            };
        }
    }
    let config: C = merged
        .try_into()
        .with_context(|| format!("combining {} with the flags", path.display()))?;
    Ok(config)
}

/// Starts logging to stderr, as text or (`json`) as JSON lines; `RUST_LOG` overrides
/// `default_level`.
pub fn init_logging(default_level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Installs the Prometheus recorder and serves `/metrics` on `addr` (port 0: any free
/// port), with the process's own figures (`process_cpu_seconds_total`, resident memory,
/// open files, threads) read at each scrape. Returns the bound address.
pub async fn serve_metrics(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    let bound = listener.local_addr()?;
    let process = metrics_process::Collector::default();
    process.describe();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle: PrometheusHandle = handle.clone();
            process.collect();
            async move { handle.render() }
        }),
    );
    tokio::spawn(async move {
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = serve.await {
            tracing::warn!("metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}

/// A token cancelled on SIGTERM or Ctrl-C (SIGINT).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot listen for SIGTERM: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: shutting down"),
        }
        t.cancel();
    });
    token
}

/// Prints the line a supervisor (the testbed, the tests) waits for: one JSON object on
/// stdout saying the daemon is up and where.
pub fn print_ready(role: &str, fields: &[(&str, String)]) {
    let mut obj = serde_json::Map::new();
    obj.insert("ready".into(), role.into());
    for (k, v) in fields {
        obj.insert((*k).into(), v.clone().into());
    }
    println!("{}", serde_json::Value::Object(obj));
}

/// The network key from a passphrase given inline or in a file (`@path`).
pub fn network_key(spec: &str) -> anyhow::Result<braid_core::wire::Key> {
    let text = match spec.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(PathBuf::from(path))
            .with_context(|| format!("reading the network key file {path}"))?
            .trim()
            .to_owned(),
        None => spec.to_owned(),
    };
    if text.len() < 8 {
        anyhow::bail!("the network key must be at least 8 characters");
    }
    Ok(braid_core::wire::Key::derive(&text))
}

/// What a daemon's config offers to [`main`].
pub trait DaemonConfig: clap::Parser + DeserializeOwned + serde::Serialize {
    /// The binary's name, for messages.
    const NAME: &'static str;
    /// The config file named with `--config`.
    fn file(&self) -> Option<&Path>;
    /// Whether `--check` was given.
    fn check(&self) -> bool;
    /// Whether `--log-json` was given.
    fn log_json(&self) -> bool {
        false
    }
    /// Checks the configuration, with a message that says what to fix.
    fn validate(&self) -> anyhow::Result<()>;
    /// Threads the daemon's tasks run on besides its main one. 0 (the default): every
    /// task on the one thread that runs `run`. With more, the main task keeps its thread
    /// and the tasks it spawns (TCP viewers; QUIC connections have none, they are driven
    /// from the main task) share this many others.
    fn task_threads(&self) -> usize {
        0
    }
}

/// A daemon's `main`: load the config (exit 2 with a message if it is bad), answer
/// `--check`, else start the runtime ([`DaemonConfig::task_threads`]) and run until
/// SIGTERM or Ctrl-C (exit 1 with a message on failure).
pub fn main<C, F, Fut>(run: F) -> std::process::ExitCode
where
    C: DaemonConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use std::process::ExitCode;
    let config = match load_config::<C>(std::env::args_os().collect(), C::file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e:#}", C::NAME);
            return ExitCode::from(2);
        }
    };
    init_logging("info", config.log_json());
    if let Err(e) = config.validate() {
        eprintln!("{}: {e:#}", C::NAME);
        return ExitCode::from(2);
    }
    if config.check() {
        println!("{}: configuration ok", C::NAME);
        return ExitCode::SUCCESS;
    }
    let runtime = match config.task_threads() {
        0 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .thread_name(format!("{}-task", C::NAME.trim_start_matches("braid-")))
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", C::NAME);
            return ExitCode::FAILURE;
        }
    };
    // `block_on` runs `run` itself on this thread, whatever the runtime.
    let outcome = runtime.block_on(async {
        let shutdown = shutdown_on_signals();
        run(config, shutdown).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e:#}", C::NAME);
            ExitCode::FAILURE
        }
    }
}

/// CPU time a process has used, user and system, in seconds (from `/proc/PID/stat`;
/// 0 where that cannot be read).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (which may hold spaces, so split after its ')'): the state is
    // field 0, utime 11, stime 12, in clock ticks of 1/100 s (the Linux default).
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Wall time now, in milliseconds since the Unix epoch (0 on a clock before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Exports a machine's drop counters as `braid_dropped_total{role, reason}`.
pub fn export_drops(role: &'static str, drops: &braid_core::node::Drops) {
    for (reason, n) in drops.iter() {
        metrics::counter!("braid_dropped_total", "role" => role, "reason" => reason).absolute(n);
    }
}

/// Sleeps until `deadline`, or forever when there is none (for a `select!` branch).
pub async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Attaches a QUIC endpoint to `socket` when this node listens on QUIC or dials any QUIC
/// peer, and marks those peers for dialing. Returns the address it accepts connections
/// on, if it does.
pub fn start_quic<'a>(
    socket: &mut crate::udp::Socket,
    options: &crate::quic::Options,
    tls: &crate::tls::Tls,
    role: &'static str,
    peers: impl IntoIterator<Item = &'a crate::addr::PeerAddr>,
) -> anyhow::Result<Option<SocketAddr>> {
    let dial: Vec<SocketAddr> = peers
        .into_iter()
        .filter(|p| p.is_quic())
        .map(|p| p.addr)
        .collect();
    if options.listen.is_none() && dial.is_empty() {
        return Ok(None);
    }
    if options.listen.is_some() && !tls.has_identity() {
        anyhow::bail!(
            "quic.listen needs a certificate: give tls.cert and tls.key (`braid-ctl dev-certs` makes development ones)"
        );
    }
    let bind = options.listen.unwrap_or_else(|| {
        let udp = socket.local_addr().ok();
        match udp {
            Some(a) if a.is_ipv6() => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
            _ => SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    });
    let (impairments, start) = socket.impairments();
    let quic = crate::quic::Quic::bind_impaired(options, bind, tls, role, impairments, start)?;
    let accepting = options.listen.is_some();
    let addr = quic.local_addr()?;
    socket.attach_quic(quic);
    if let Some(q) = socket.quic_mut() {
        for d in dial {
            q.connect_now(d);
        }
    }
    Ok(accepting.then_some(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, clap::Parser, serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields)]
    struct Example {
        #[arg(long)]
        #[serde(default)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "edge")]
        #[serde(default = "edge")]
        role: String,
        #[arg(long, default_value_t = 200)]
        #[serde(default = "window")]
        window: u64,
        #[arg(long = "peer")]
        #[serde(default)]
        peers: Vec<SocketAddr>,
        #[command(flatten)]
        #[serde(default)]
        tls: crate::tls::Tls,
        #[command(flatten)]
        #[serde(default)]
        quic: crate::quic::Options,
    }

    fn edge() -> String {
        "edge".into()
    }
    fn window() -> u64 {
        200
    }

    fn load(toml: &str, flags: &[&str]) -> anyhow::Result<Example> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "braid-config-test-{}-{n}-{}",
            std::process::id(),
            toml.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, toml).unwrap();
        let mut args: Vec<OsString> = vec!["x".into(), "--config".into(), file.into_os_string()];
        args.extend(flags.iter().map(OsString::from));
        load_config::<Example>(args, |c| c.config.as_deref())
    }

    #[test]
    fn flags_of_a_group_override_its_table_and_leave_the_rest() {
        let toml = "[tls]\ncert = \"a.pem\"\nkey = \"a.key\"\nca = \"ca.pem\"\n[quic]\ninitial_mtu = 1300\n";
        let c = load(
            toml,
            &["--tls-ca", "other.pem", "--quic-listen", "127.0.0.1:9"],
        )
        .unwrap();
        assert_eq!(c.tls.cert.as_deref(), Some(Path::new("a.pem")));
        assert_eq!(c.tls.ca.as_deref(), Some(Path::new("other.pem")));
        assert_eq!(
            c.quic.initial_mtu, 1300,
            "a default flag does not clobber the file"
        );
        assert_eq!(c.quic.listen, Some("127.0.0.1:9".parse().unwrap()));
        assert!(
            load("[tls]\nbogus = 1\n", &[]).is_err(),
            "unknown keys in a group refused"
        );
    }

    #[test]
    fn cli_does_not_clobber_toml_with_defaults() {
        let c = load("role = \"set\"\nwindow = 400\n", &[]).unwrap();
        assert_eq!((c.role.as_str(), c.window), ("set", 400));
    }

    #[test]
    fn cli_given_flags_override_toml() {
        let c = load(
            "role = \"set\"\nwindow = 400\npeers = [\"127.0.0.1:1\"]\n",
            &[
                "--window",
                "50",
                "--peer",
                "127.0.0.1:2",
                "--peer",
                "127.0.0.1:3",
            ],
        )
        .unwrap();
        assert_eq!(c.role, "set");
        assert_eq!(c.window, 50);
        assert_eq!(c.peers.len(), 2);
    }

    #[test]
    fn bad_toml_is_a_clear_error() {
        let e = load("windoww = 3\n", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("windoww"), "{e:#}");
        let e = load("window = \"soon\"\n", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("window"), "{e:#}");
    }
}
