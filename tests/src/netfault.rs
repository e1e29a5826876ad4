//! Network partitions with Linux network namespaces: a [`Netns`] is a namespace joined to the
//! host by a veth pair on a private `/30` (host side `10.201.K.1`, namespace side
//! `10.201.K.2`). A node started inside it (`ip netns exec`, see
//! [`Placement`](crate::process::Placement)) reaches the host's processes at
//! [`Netns::host_ip`] and is reached at [`Netns::ns_ip`]; [`Netns::cut`] takes the
//! namespace's end of the link down (the node is cut off from etcd and from every peer, in
//! both directions; the host's packets to it are dropped, not refused) and [`Netns::heal`]
//! brings it back up.
//!
//! Needs root (CI runs as root) and the `ip` tool (Debian `iproute2`). A test that cannot
//! create the namespace must fail, not skip: [`Netns::create`] returns the exact command that
//! failed and its output. Dropping a [`Netns`] deletes the namespace and the veth pair, also
//! when the test panics.

use std::net::Ipv4Addr;
use std::process::Command;

/// A network namespace with a veth link to the host. Deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    subnet: u8,
}

/// Runs `ip ARGS`; the error names the command and its output.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Netns {
    /// Creates a namespace and its veth link, both up, on a free `10.201.K.0/30`.
    ///
    /// # Errors
    /// The failing `ip` command and its output (e.g. not root, no `ip`, no netns support).
    pub fn create() -> Result<Netns, String> {
        let mut last = String::new();
        // A random subnet; another test's namespace may hold it, then try the next one.
        let first: u8 = rand::random();
        for i in 0..16u8 {
            let subnet = first.wrapping_add(i.wrapping_mul(17));
            let id = format!("{:06x}", rand::random::<u32>() & 0x00ff_ffff);
            let ns = Netns {
                name: format!("tg-{id}"),
                host_if: format!("tgh{id}"),
                ns_if: format!("tgn{id}"),
                subnet,
            };
            match ns.set_up() {
                Ok(()) => return Ok(ns),
                Err(e) => last = e,
            }
            // `ns` is dropped here: whatever was made is removed.
        }
        Err(format!("cannot create a network namespace: {last}"))
    }

    fn set_up(&self) -> Result<(), String> {
        let host_cidr = format!("{}/30", self.host_ip());
        let ns_cidr = format!("{}/30", self.ns_ip());
        // A subnet already on the host belongs to another namespace of a parallel test.
        let routes = Command::new("ip")
            .args([
                "-4",
                "route",
                "show",
                &format!("10.201.{}.0/30", self.subnet),
            ])
            .output()
            .map_err(|e| format!("cannot run `ip route`: {e}"))?;
        if !routes.stdout.is_empty() {
            return Err(format!("subnet 10.201.{}.0/30 in use", self.subnet));
        }
        ip(&["netns", "add", &self.name])?;
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.ns_if,
        ])?;
        ip(&["link", "set", &self.ns_if, "netns", &self.name])?;
        ip(&["addr", "add", &host_cidr, "dev", &self.host_if])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        self.in_ns(&["addr", "add", &ns_cidr, "dev", &self.ns_if])?;
        self.in_ns(&["link", "set", &self.ns_if, "up"])?;
        self.in_ns(&["link", "set", "lo", "up"])?;
        Ok(())
    }

    fn in_ns(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the link: what a process in the namespace connects to.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.subnet, 1)
    }

    /// The namespace's address on the link: where the host reaches a process inside.
    pub fn ns_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.subnet, 2)
    }

    /// Cuts the link: takes the namespace's end down. Packets either way are lost.
    ///
    /// # Errors
    /// The failing `ip` command.
    pub fn cut(&self) -> Result<(), String> {
        self.in_ns(&["link", "set", &self.ns_if, "down"])
    }

    /// Heals the link: brings the namespace's end up again (its address and route return).
    ///
    /// # Errors
    /// The failing `ip` command.
    pub fn heal(&self) -> Result<(), String> {
        self.in_ns(&["link", "set", &self.ns_if, "up"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it the host's end;
        // the host's end is deleted explicitly too in case the pair never reached the
        // namespace. Errors mean "already gone".
        let _ = ip(&["netns", "delete", &self.name]);
        let _ = ip(&["link", "delete", &self.host_if]);
    }
}
