//! A network of test hosts: each host is its own network namespace with one veth into a
//! bridge that lives in a namespace of its own (the switch). The test process joins the
//! switch through one more veth, so it reaches every host as a client would. Faults are
//! nftables rules inside the hosts' namespaces: a cut link drops packets without a word
//! (no reset, no ICMP), one way or both, the way a failed cable, switch port or firewall
//! does. Needs root and `nft` (scripts/test installs nftables). Everything is removed when
//! the fabric is dropped, also when the test fails.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// One host: a namespace, its address on the fabric.
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: String,
}

impl Host {
    /// `program` run inside the host (`ip netns exec` execs it: same pid).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }
}

pub struct Fabric {
    tag: String,
    switch: String,
    /// `10.214.N`: the fabric's /24; the test process is `.1`, hosts from `.10`.
    subnet: String,
    uplink: String,
    hosts: Mutex<Vec<String>>,
    /// (from, to) ip pairs whose packets are dropped, as installed.
    blocked: Mutex<BTreeSet<(String, String)>>,
}

/// Runs `program` to its end; panics with its stderr unless it succeeds.
pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nft_in(ns: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running nft (scripts/test installs nftables)");
    child
        .stdin
        .take()
        .expect("nft stdin")
        .write_all(script.as_bytes())
        .expect("writing the nft script");
    let out = child.wait_with_output().expect("waiting for nft");
    assert!(
        out.status.success(),
        "nft in {ns}: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Fabric {
    /// A fabric named after this process and `index` (distinct per test of one binary),
    /// on `10.214.N.0/24` where N is unique per (process, index) among live fabrics.
    pub fn new(index: u8) -> Fabric {
        let pid = std::process::id();
        let tag = format!("{}{index}", pid % 100_000);
        let n = (pid % 25) * 10 + u32::from(index % 10);
        let fabric = Fabric {
            switch: format!("syf{tag}-sw"),
            subnet: format!("10.214.{n}"),
            uplink: format!("syf{tag}"),
            tag,
            hosts: Mutex::new(Vec::new()),
            blocked: Mutex::new(BTreeSet::new()),
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &fabric.switch])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &fabric.uplink])
            .output();
        run("ip", &["netns", "add", &fabric.switch]);
        let sw = fabric.switch.as_str();
        run("ip", &["-n", sw, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", sw, "link", "set", "br0", "up"]);
        run(
            "ip",
            &[
                "link",
                "add",
                &fabric.uplink,
                "type",
                "veth",
                "peer",
                "name",
                "uplink",
                "netns",
                sw,
            ],
        );
        run(
            "ip",
            &[
                "-n", sw, "link", "set", "dev", "uplink", "master", "br0", "up",
            ],
        );
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}.1/24", fabric.subnet),
                "dev",
                &fabric.uplink,
            ],
        );
        run("ip", &["link", "set", &fabric.uplink, "up"]);
        fabric
    }

    /// The test process's own address on the fabric.
    pub fn client_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// A new host `name` at `10.214.N.(10 + i)`.
    pub fn host(&self, name: &str) -> Host {
        let mut hosts = self.hosts.lock().unwrap();
        let i = hosts.len();
        let ns = format!("syf{}-{name}", self.tag);
        let ip = format!("{}.{}", self.subnet, 10 + i);
        let port = format!("h{i}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run("ip", &["netns", "add", &ns]);
        hosts.push(ns.clone());
        let sw = self.switch.as_str();
        run(
            "ip",
            &[
                "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ],
        );
        run(
            "ip",
            &["-n", sw, "link", "set", "dev", &port, "master", "br0", "up"],
        );
        run(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        nft_in(
            &ns,
            "table inet fault {\n\
               chain in { type filter hook input priority 0; policy accept; }\n\
               chain out { type filter hook output priority 0; policy accept; }\n\
             }\n",
        );
        Host {
            name: name.to_owned(),
            ns,
            ip,
        }
    }

    /// Drops every packet `from` sends to `to` (at `to`'s door: `from` sees silence).
    /// Replies the other way still pass, to connections that can still form.
    pub fn block(&self, from: &Host, to: &Host) {
        self.blocked
            .lock()
            .unwrap()
            .insert((from.ip.clone(), to.ip.clone()));
        nft_in(
            &to.ns,
            &format!("add rule inet fault in ip saddr {} drop\n", from.ip),
        );
    }

    /// Cuts the link between `a` and `b` both ways.
    pub fn cut(&self, a: &Host, b: &Host) {
        self.block(a, b);
        self.block(b, a);
    }

    /// Cuts `h` from every host in `others`, both ways.
    pub fn isolate(&self, h: &Host, others: &[&Host]) {
        for o in others {
            self.cut(h, o);
        }
    }

    /// Whether a TCP connection from inside `from` to `ip:port` forms within a second:
    /// how a test shows that a cut is one, and that it cut nothing else.
    pub fn connects(&self, from: &Host, ip: &str, port: u16) -> bool {
        from.command("timeout")
            .args(["1", "bash", "-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Removes every fault: all links pass again.
    pub fn heal(&self) {
        self.blocked.lock().unwrap().clear();
        for ns in self.hosts.lock().unwrap().iter() {
            nft_in(
                ns,
                "flush chain inet fault in\nflush chain inet fault out\n",
            );
        }
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of every veth pair, and so the pair.
        for ns in self.hosts.lock().unwrap().iter() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.uplink])
            .output();
    }
}

impl Fabric {
    /// What identifies this fabric's namespaces; see [`leftover_namespaces`].
    pub fn tag(&self) -> String {
        self.tag.clone()
    }
}

/// Every namespace of the fabric tagged `tag` that still exists (none should once the
/// fabric is dropped).
pub fn leftover_namespaces(tag: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let mine = format!("syf{tag}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(&mine))
        .map(str::to_owned)
        .collect()
}
