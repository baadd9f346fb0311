//! Hosts for multi-host tests: each a network namespace of its own with one address, all
//! joined through a bridge in a hub namespace, so that a test can cut a host's link
//! (`ip link set ... down`), rate-limit it (`tc ... tbf`), or freeze and kill the host's
//! processes, as on separate machines. Everything is made under names carrying this
//! process's id, and removed when the [`Hosts`] are dropped. When the process is killed
//! (SIGKILL runs no destructor), a guard started with the hosts (its own process group,
//! so a group kill spares it) removes them within a second; namespaces left all the same
//! are removed by the next [`Hosts::new`].

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why hosts cannot be made here.
pub fn unavailable() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Some("not root: network namespaces need it".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("no `ip` command (iproute2)".into());
    }
    None
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The body of `GET path` from `addr`, fetched inside network namespace `netns` with
/// bash's `/dev/tcp` (nothing else need be installed); empty when nothing answers. `path`
/// must be URL-encoded already.
pub fn http_get_in(netns: &str, addr: std::net::SocketAddr, path: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && printf 'GET {} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3",
        addr.ip(),
        addr.port(),
        path.replace('%', "%%")
    );
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "bash", "-c", &script])
        .output()
        .expect("bash in the namespace");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned())
}

/// `tc ARGS` in network namespace `ns`, which must succeed (`host` names it in the
/// message).
fn tc_in(ns: &str, args: &[&str], host: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "tc"])
        .args(args)
        .output()
        .expect("tc");
    assert!(
        out.status.success(),
        "tc {args:?} on {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its name in the test.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address (on the hosts' /24).
    pub addr: Ipv4Addr,
    /// Its link's end in the hub (what [`Hosts::cut`] takes down).
    hub_end: String,
}

/// Hosts joined through one bridge.
#[derive(Debug)]
pub struct Hosts {
    hub: String,
    /// The hosts, in the order named.
    pub hosts: Vec<Host>,
    /// Removes the namespaces if this process dies without dropping the hosts.
    guard: Option<Child>,
}

/// A process that waits for process `pid` to end, then deletes `netns`.
fn guard(pid: u32, netns: &[String]) -> Option<Child> {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; for n in {}; do ip netns del \"$n\" 2>/dev/null; done",
        netns.join(" ")
    );
    Command::new("sh")
        .args(["-c", &script])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// Namespaces of this code whose process is gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("braidh-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Hosts {
    /// Hosts named `names`, at 10.77.0.1, .2, ... (each set of hosts is a network of its
    /// own: addresses repeat between sets without meeting).
    pub fn new(names: &[&str]) -> Result<Hosts, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        remove_stale();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", pid % 100_000, n);
        let hub = format!("braidh-{pid}-{n}-hub");
        let mut hosts = Hosts {
            hub: hub.clone(),
            hosts: Vec::new(),
            guard: None,
        };
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let netns = format!("braidh-{pid}-{n}-{i}");
            let addr = Ipv4Addr::new(10, 77, 0, i as u8 + 1);
            // veth names: at most 15 bytes, unique on the machine while both ends exist.
            let here = format!("bh{tag}x{i}");
            let there = format!("bh{tag}y{i}");
            ip(&["netns", "add", &netns])?;
            hosts.hosts.push(Host {
                name: (*name).to_owned(),
                netns: netns.clone(),
                addr,
                hub_end: there.clone(),
            });
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&[
                "link", "add", &here, "netns", &netns, "type", "veth", "peer", "name", &there,
                "netns", &hub,
            ])?;
            ip(&["-n", &netns, "link", "set", &here, "name", "eth0"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &hub, "link", "set", &there, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &there, "up"])?;
        }
        let mut all: Vec<String> = hosts.hosts.iter().map(|h| h.netns.clone()).collect();
        all.push(hub);
        hosts.guard = guard(pid, &all);
        Ok(hosts)
    }

    /// Sends `signal` (`STOP`, `CONT`, `KILL`) to every process on host `name`.
    fn signal_all(&self, name: &str, signal: &str) {
        let h = self.get(name);
        let out = Command::new("ip")
            .args(["netns", "pids", &h.netns])
            .output()
            .expect("ip netns pids");
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), pid])
                .status();
        }
    }

    /// Freezes every process on host `name` (SIGSTOP): it holds its sockets and says
    /// nothing, as a hung machine does, until [`Hosts::thaw`].
    pub fn freeze(&self, name: &str) {
        self.signal_all(name, "STOP");
    }

    /// Lets a frozen host run again.
    pub fn thaw(&self, name: &str) {
        self.signal_all(name, "CONT");
    }

    /// Kills every process on host `name` (SIGKILL), as when the machine dies.
    pub fn kill_all(&self, name: &str) {
        self.signal_all(name, "KILL");
    }

    /// The host named `name`.
    pub fn get(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Cuts `name`'s link: nothing goes in or out until [`Hosts::restore`].
    pub fn cut(&self, name: &str) {
        let h = self.get(name);
        ip(&["-n", &self.hub, "link", "set", &h.hub_end, "down"]).expect("link down");
    }

    /// The body of `GET path` from `addr`, fetched on host `name` (inside its namespace,
    /// where the test cannot connect itself); empty when nothing answers. `path` must be
    /// URL-encoded already.
    pub fn http_get(&self, name: &str, addr: std::net::SocketAddr, path: &str) -> String {
        http_get_in(&self.get(name).netns, addr, path)
    }

    /// The metrics of a daemon on host `name` listening at `addr`.
    pub fn scrape(&self, name: &str, addr: std::net::SocketAddr) -> Vec<(String, f64)> {
        crate::harness::metrics::parse(&self.http_get(name, addr, "/metrics"))
    }

    /// Caps `name`'s link at `rate` (a `tc` rate such as `1mbit`) both ways, with a token
    /// bucket (`tc ... tbf`): what does not fit waits in a 100 ms queue, then is dropped.
    pub fn limit(&self, name: &str, rate: &str) {
        self.tc(
            name,
            &[
                "replace", "root", "tbf", "rate", rate, "burst", "16kb", "latency", "100ms",
            ],
        );
    }

    /// Caps what host `from` sends to host `to` at `rate`, on `from`'s own end of its
    /// link (`htb`, a class for `to`'s address): the datagrams wait in `from`'s queue,
    /// held against the socket that sent them, as behind a slow local link, while
    /// everything else `from` sends goes at full speed. The queue is long (100,000
    /// datagrams), so the sender's socket buffer fills before it drops any.
    pub fn limit_toward(&self, from: &str, to: &str, rate: &str) {
        let (ns, dst) = (self.get(from).netns.clone(), self.get(to).addr);
        let tc = |args: &[&str]| tc_in(&ns, args, from);
        let dst = format!("{dst}/32");
        tc(&[
            "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1",
        ]);
        for (class, rate) in [("1:1", "10gbit"), ("1:2", rate)] {
            tc(&[
                "class", "add", "dev", "eth0", "parent", "1:", "classid", class, "htb", "rate",
                rate, "ceil", rate, "quantum", "60000",
            ]);
        }
        tc(&[
            "qdisc", "add", "dev", "eth0", "parent", "1:2", "pfifo", "limit", "100000",
        ]);
        tc(&[
            "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "dst", &dst, "flowid", "1:2",
        ]);
    }

    /// Lifts the cap [`Hosts::limit`] put on `name`'s link.
    pub fn unlimit(&self, name: &str) {
        self.tc(name, &["del", "root"]);
    }

    /// `tc qdisc <op> dev <dev> <rest>` on both ends of `name`'s link.
    fn tc(&self, name: &str, args: &[&str]) {
        let h = self.get(name);
        let (op, rest) = args.split_first().expect("an operation");
        for (ns, dev) in [
            (h.netns.as_str(), "eth0"),
            (self.hub.as_str(), h.hub_end.as_str()),
        ] {
            let args: Vec<&str> = ["qdisc", op, "dev", dev]
                .into_iter()
                .chain(rest.iter().copied())
                .collect();
            tc_in(ns, &args, name);
        }
    }

    /// Restores `name`'s link.
    pub fn restore(&self, name: &str) {
        let h = self.get(name);
        ip(&["-n", &self.hub, "link", "set", &h.hub_end, "up"]).expect("link up");
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
        // Deleting a namespace deletes the veth ends in it, and with them their peers.
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.netns]);
        }
        let _ = ip(&["netns", "del", &self.hub]);
    }
}
