//! A test host in its own network namespace, joined to this one by a veth pair, whose
//! link a test can cut the way a switch port or a cable fails: packets vanish, nobody
//! answers with a reset. Needs root (CI runs as root). The namespace and the veth pair
//! are removed when the host is dropped, also when the test fails.

use std::process::Command;

pub struct NetHost {
    ns: String,
    outer_if: String,
    inner_if: String,
    /// This host's address, reachable from the test's namespace.
    pub ip: String,
    /// The test's side of the link, reachable from the host (services the host must
    /// reach, such as etcd, listen here too).
    pub outer_ip: String,
}

fn ip(args: &[&str]) {
    super::fabric::run("ip", args);
}

impl NetHost {
    /// A namespace named after this process (so parallel test binaries do not collide)
    /// and `tag`, with `10.213.S.2/30` inside and `.1` outside. The /30 is ours alone:
    /// nothing outside the namespaces this test made is ever addressed.
    pub fn create(tag: u8) -> NetHost {
        let pid = std::process::id();
        let subnet = 16 + (pid % 200) as u8 / 4 * 4 + tag % 4;
        let ns = format!("sy{pid}-{tag}");
        // Interface names are at most 15 bytes.
        let outer_if = format!("syo{}{tag}", pid % 100_000);
        let inner_if = format!("syi{}{tag}", pid % 100_000);
        let host = NetHost {
            ip: format!("10.213.{subnet}.2"),
            outer_ip: format!("10.213.{subnet}.1"),
            ns,
            outer_if,
            inner_if,
        };
        let _ = Command::new("ip").args(["netns", "del", &host.ns]).output();
        ip(&["netns", "add", &host.ns]);
        ip(&[
            "link",
            "add",
            &host.outer_if,
            "type",
            "veth",
            "peer",
            "name",
            &host.inner_if,
        ]);
        ip(&["link", "set", &host.inner_if, "netns", &host.ns]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", host.outer_ip),
            "dev",
            &host.outer_if,
        ]);
        ip(&["link", "set", &host.outer_if, "up"]);
        host.inside(&[
            "addr",
            "add",
            &format!("{}/30", host.ip),
            "dev",
            &host.inner_if,
        ]);
        host.inside(&["link", "set", &host.inner_if, "up"]);
        host.inside(&["link", "set", "lo", "up"]);
        host
    }

    fn inside(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.ns, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `program` run inside the namespace (`ip netns exec` execs it: same pid).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }

    /// `switchyard expert-node` on this host with the bundled model, and `args`; returns it
    /// and its address.
    pub fn expert_node(&self, name: &str, args: &[&str]) -> (super::Proc, String) {
        let mut cmd = self.command(super::exe());
        cmd.args([
            "expert-node",
            "--listen",
            &format!("{}:0", self.ip),
            "--model",
        ])
        .arg(super::tiny_model())
        .args(args);
        super::Proc::start(name, cmd, "listening on ")
    }

    /// Takes the host's side of the link down: what the other side sends is dropped
    /// without a word.
    pub fn cut(&self) {
        self.inside(&["link", "set", &self.inner_if, "down"]);
    }

    pub fn heal(&self) {
        self.inside(&["link", "set", &self.inner_if, "up"]);
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer_if])
            .output();
    }
}
