//! [`Lab`]: network partitions on this machine, made with network namespaces (issue #14's
//! partition promise).
//!
//! A test that needs a partition runs twice. Started by `cargo test`, it re-runs itself (the
//! same test binary, only that test) inside a new user and network namespace:
//! `unshare --user --map-root-user --net --mount`, with [`INSIDE_ENV`] set ([`run_inside`]).
//! There it is root over a network of its own and nothing of the host's, without being root on
//! the machine. Inside, [`Lab::new`] makes a bridge (the "switch", address [`HUB`]) in that
//! namespace and [`Lab::place`] gives a process a namespace of its own with one cable to the
//! switch (a veth pair) and an address on it. The test's own code, and any process started
//! without a place, sit on the switch at [`HUB`].
//!
//! [`Lab::cut`] takes a place's cable down: its process keeps running and its TCP connections
//! stay open, but no packet passes either way, as when a machine's network is unplugged —
//! unlike a kill (connections reset at once) or SIGSTOP (the process stops). [`Lab::heal`] plugs
//! it back. Needs `unshare` (util-linux) and `ip` (iproute2): `tests/run.sh` installs iproute2
//! when it is missing.

use std::path::Path;
use std::process::{Command, Stdio};

/// Set (to "1") in the re-run test inside the namespaces.
pub const INSIDE_ENV: &str = "YEONGYE_TEST_IN_NETNS";
/// The switch's address: the test itself, and every process without a place of its own.
pub const HUB: &str = "10.77.0.1";
const PREFIX: &str = "/24";
const BRIDGE: &str = "ylab0";

/// Whether this process runs inside the lab's namespaces (the re-run).
pub fn inside() -> bool {
    std::env::var_os(INSIDE_ENV).is_some_and(|v| v == "1")
}

/// Runs the test `test` (its full path, e.g. `partition::x`) again in this binary, inside a
/// new user, network and mount namespace, with its output passed through; panics unless it
/// passed. Called by the test itself when not [`inside`].
pub fn run_inside(test: &str) {
    for tool in ["unshare", "ip"] {
        let found = Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "`{tool}` is needed for the partition tests (util-linux and iproute2): ./tests/run.sh installs iproute2"
        );
    }
    let exe = std::env::current_exe().expect("current_exe");
    // /run is replaced by an empty tmpfs in the new mount namespace: `ip netns` keeps its
    // namespaces under /run/netns, which an unprivileged user may not write on the host.
    let status = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--mount", "--"])
        .args([
            "sh",
            "-c",
            "mount -t tmpfs yeongye-lab /run && exec \"$@\"",
            "sh",
        ])
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(INSIDE_ENV, "1")
        .status()
        .unwrap_or_else(|e| panic!("cannot run unshare: {e}"));
    assert!(
        status.success(),
        "{test}, run inside its network namespaces, failed ({status}): its output is above"
    );
}

/// The switch and the places on it, inside the lab's namespaces. Made once per test.
pub struct Lab {
    places: Vec<String>,
}

impl Lab {
    /// Brings up loopback and the switch. Panics outside [`run_inside`].
    pub fn new() -> Lab {
        assert!(inside(), "Lab::new outside the lab's namespaces");
        ip(&["link", "set", "lo", "up"]);
        ip(&["link", "add", BRIDGE, "type", "bridge"]);
        ip(&["addr", "add", &format!("{HUB}{PREFIX}"), "dev", BRIDGE]);
        ip(&["link", "set", BRIDGE, "up"]);
        Lab { places: Vec::new() }
    }

    /// A place called `name` (at most 12 characters) at `10.77.0.<host>`: a network namespace
    /// with loopback and one cable to the switch. Returns its address.
    pub fn place(&mut self, name: &str, host: u8) -> String {
        assert!(name.len() <= 12 && host > 1, "place {name:?} at .{host}");
        let addr = format!("10.77.0.{host}");
        let cable = cable(name);
        ip(&["netns", "add", name]);
        ip(&[
            "link", "add", &cable, "type", "veth", "peer", "name", "eth0", "netns", name,
        ]);
        ip(&["link", "set", &cable, "master", BRIDGE, "up"]);
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{addr}{PREFIX}"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", name, "link", "set", "eth0", "up"]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        self.places.push(name.to_owned());
        addr
    }

    /// Unplugs `name`'s cable: nothing passes between it and anyone until [`Lab::heal`].
    pub fn cut(&self, name: &str) {
        self.known(name);
        ip(&["link", "set", &cable(name), "down"]);
    }

    /// Plugs `name`'s cable back in.
    pub fn heal(&self, name: &str) {
        self.known(name);
        ip(&["link", "set", &cable(name), "up"]);
    }

    fn known(&self, name: &str) {
        assert!(self.places.iter().any(|p| p == name), "no place {name:?}");
    }
}

impl Default for Lab {
    fn default() -> Lab {
        Lab::new()
    }
}

/// `program` to be run in place `name` (`None`: on the switch, as the test itself).
pub fn command(program: &Path, place: Option<&str>) -> Command {
    match place {
        Some(name) => {
            // `ip netns exec` execs the program: the child's pid is the program's own, so
            // signals and kills reach it.
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", name]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

fn cable(name: &str) -> String {
    format!("y-{name}")
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip: {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
