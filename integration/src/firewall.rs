//! Firewall rules for partition tests (issue 17). The rules live in an
//! nftables table the test owns (never `flush ruleset`), match only
//! loopback traffic (`ip saddr 127.0.0.0/8 ip daddr 127.0.0.0/8`, or
//! narrower addresses inside it), are removed when the test ends, pass or
//! fail, and count what they match so a test can assert its rules did.

use std::io::Write;
use std::process::{Command, Stdio};

/// An nftables table of this test's, deleted on drop.
pub struct Firewall {
    table: String,
}

impl Firewall {
    pub fn new(tag: &str) -> Firewall {
        let table = format!("iomfs_test_{tag}_{}", std::process::id());
        let fw = Firewall { table };
        fw.nft(&format!(
            "add table inet {t}\nadd chain inet {t} out {{ type filter hook output priority 0; policy accept; }}\n",
            t = fw.table
        ));
        fw
    }

    pub fn nft(&self, script: &str) {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nft (scripts/install-deps installs nftables)");
        child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write nft script");
        let out = child.wait_with_output().expect("nft");
        assert!(out.status.success(), "nft -f: {}\n{script}", String::from_utf8_lossy(&out.stderr));
    }

    /// Drops UDP between the IOMs listening on ports `a` and those on
    /// ports `b`, both ways (IOMs send from the port they listen on).
    pub fn cut(&self, a: &[u16], b: &[u16]) {
        self.cut_one_way(a, b);
        self.cut_one_way(b, a);
    }

    /// Drops UDP from the IOMs listening on ports `from` to those on ports
    /// `to`, one way only (asymmetric loss: `to` still reaches `from`).
    pub fn cut_one_way(&self, from: &[u16], to: &[u16]) {
        let set = |p: &[u16]| p.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ");
        self.nft(&format!(
            "add rule inet {} out ip saddr 127.0.0.0/8 ip daddr 127.0.0.0/8 udp sport {{ {} }} udp dport {{ {} }} \
             counter drop\n",
            self.table,
            set(from),
            set(to)
        ));
    }

    /// Drops all UDP from and to address `ip` (one "host"), to and from
    /// every other loopback address.
    pub fn isolate(&self, ip: std::net::Ipv4Addr) {
        assert!(ip.is_loopback(), "{ip} is not a loopback address: tests touch only 127.0.0.0/8");
        let t = &self.table;
        self.nft(&format!(
            "add rule inet {t} out ip saddr {ip} ip daddr 127.0.0.0/8 udp dport 1-65535 counter drop\n\
             add rule inet {t} out ip saddr 127.0.0.0/8 ip daddr {ip} udp dport 1-65535 counter drop\n"
        ));
    }

    /// Drops UDP between addresses `a` and `b` only, both ways (the path
    /// between two hosts fails; each still reaches every other).
    pub fn cut_addrs(&self, a: std::net::Ipv4Addr, b: std::net::Ipv4Addr) {
        assert!(a.is_loopback() && b.is_loopback(), "{a}, {b}: tests touch only 127.0.0.0/8");
        let t = &self.table;
        self.nft(&format!(
            "add rule inet {t} out ip saddr {a} ip daddr {b} udp dport 1-65535 counter drop\n\
             add rule inet {t} out ip saddr {b} ip daddr {a} udp dport 1-65535 counter drop\n"
        ));
    }

    /// Counts (lets through) UDP sent from address `ip`; read with `matched`.
    pub fn count_from(&self, ip: std::net::Ipv4Addr) {
        assert!(ip.is_loopback(), "{ip} is not a loopback address: tests touch only 127.0.0.0/8");
        self.nft(&format!("add rule inet {} out ip saddr {ip} ip daddr 127.0.0.0/8 counter accept\n", self.table));
    }

    /// Packets the rules matched so far (dropped or counted).
    pub fn matched(&self) -> u64 {
        let out = Command::new("nft").args(["list", "table", "inet", &self.table]).output().expect("nft list");
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        words.windows(2).filter(|w| w[0] == "packets").filter_map(|w| w[1].parse::<u64>().ok()).sum()
    }

    pub fn heal(&self) {
        self.nft(&format!("flush chain inet {} out\n", self.table));
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).output();
    }
}
