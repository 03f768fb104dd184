//! Hosts of the test's own: network namespaces behind one router namespace, so that two clients can
//! reach each other directly (host candidates, a routed path) instead of over loopback.
//!
//! Host `i` is `10.213.{i+1}.2/24` on its `eth0`; the router is `10.213.{i+1}.1` on its side of
//! that link and forwards between the hosts (IPv4 forwarding on in the router namespace only).
//! The hosts reach Synapse and Switchboard, which listen on this machine's loopback, through TCP
//! forwarders: [`Lan::forward_tcp`] listens on `127.0.0.1:port` inside every host and connects to
//! `127.0.0.1:port` here. UDP is not forwarded, so Switchboard's TURN relay is out of the hosts'
//! reach: a data channel between them is direct or nothing. Everything is removed on drop.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::task::JoinHandle;

/// Lans made by this process so far (their namespace names must differ).
static LANS: AtomicU32 = AtomicU32::new(0);

pub struct Lan {
    router: String,
    hosts: Vec<String>,
    forwarders: Vec<JoinHandle<()>>,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(output.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
}

impl Lan {
    /// `hosts` namespaces behind one router, or `None` (after [`super::skip`]) when this process
    /// cannot make namespaces (not root, or no `ip` from iproute2).
    pub fn create(hosts: usize) -> Option<Lan> {
        let can = Command::new("ip").args(["netns", "list"]).output().is_ok_and(|out| out.status.success())
            && std::fs::read_to_string("/proc/self/status")
                .is_ok_and(|status| status.lines().any(|line| line.starts_with("Uid:\t0\t")));
        if !can {
            super::skip("network namespaces need root and `ip` (iproute2)");
            return None;
        }
        let tag = format!("sb{}n{}", std::process::id(), LANS.fetch_add(1, Ordering::Relaxed));
        let lan = Lan {
            router: format!("{tag}r"),
            hosts: (0..hosts).map(|i| format!("{tag}h{i}")).collect(),
            forwarders: Vec::new(),
        };
        ip(&["netns", "add", &lan.router]);
        ip(&["-n", &lan.router, "link", "set", "lo", "up"]);
        let forwarding = Command::new("ip")
            .args(["netns", "exec", &lan.router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .status()
            .expect("run sysctl in the router namespace");
        assert!(forwarding.success(), "forwarding in the router namespace");
        for (i, host) in lan.hosts.iter().enumerate() {
            let link = format!("r{i}");
            let net = i + 1;
            ip(&["netns", "add", host]);
            ip(&["-n", host, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &lan.router,
                "link",
                "add",
                &link,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host,
            ]);
            ip(&["-n", &lan.router, "addr", "add", &format!("10.213.{net}.1/24"), "dev", &link]);
            ip(&["-n", &lan.router, "link", "set", &link, "up"]);
            ip(&["-n", host, "addr", "add", &format!("10.213.{net}.2/24"), "dev", "eth0"]);
            ip(&["-n", host, "link", "set", "eth0", "up"]);
            ip(&["-n", host, "route", "add", "default", "via", &format!("10.213.{net}.1")]);
        }
        Some(lan)
    }

    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Runs `work` on a new thread that has entered host `host`'s network namespace: every socket
    /// it creates (and every thread it starts) belongs to that host.
    pub fn on_host<T: Send + 'static>(
        &self,
        host: usize,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.hosts[host]);
        std::thread::spawn(move || {
            let namespace = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            nix::sched::setns(namespace.as_raw_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("enter {path}: {e}"));
            work()
        })
    }

    /// A tokio runtime whose threads are all in host `host`'s namespace (two workers).
    pub fn runtime(&self, host: usize) -> tokio::runtime::Runtime {
        self.on_host(host, || {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
        })
        .join()
        .expect("build a runtime in the namespace")
    }

    /// Inside every host, `127.0.0.1:port` leads to `127.0.0.1:port` of this machine (one
    /// connection here per connection there), until the `Lan` is dropped. Call from within a tokio
    /// runtime of this machine's namespace.
    pub fn forward_tcp(&mut self, port: u16) {
        for host in 0..self.hosts.len() {
            let listener = self
                .on_host(host, move || std::net::TcpListener::bind(("127.0.0.1", port)))
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("listen on port {port} in host {host}: {e}"));
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            self.forwarders.push(tokio::spawn(async move {
                // Ends when the Lan is dropped (the task is aborted) or the listener fails.
                while let Ok((mut inside, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let Ok(mut outside) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                        else {
                            return;
                        };
                        let _ = inside.set_nodelay(true);
                        let _ = outside.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
                    });
                }
            }));
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for forwarder in &self.forwarders {
            forwarder.abort();
        }
        // Deleting a namespace deletes its ends of the veth pairs, and so the pairs.
        for name in self.hosts.iter().chain(std::iter::once(&self.router)) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}
