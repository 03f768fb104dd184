//! coturn (Debian's `turnserver`), the reference TURN relay, started the same way by every bench
//! that compares against it.

use std::process::{Child, Command, Stdio};

/// A child process killed when dropped (coturn, coturn's echo peer).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// coturn on 127.0.0.1:`port` (UDP and TCP), relaying from 127.0.0.1 to loopback peers, with TURN
/// REST credentials under `secret` in `realm`, logging nothing; `extra` flags go before the
/// start. Relay ports 40000–49999.
pub fn start(port: u16, secret: &str, realm: &str, extra: &[std::ffi::OsString]) -> KillOnDrop {
    let child = Command::new("turnserver")
        .args(["-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1", "--listening-port"])
        .arg(port.to_string())
        .args(extra)
        .args(["--use-auth-secret", &format!("--static-auth-secret={secret}"), "--realm", realm])
        .args([
            "--allow-loopback-peers",
            "--no-cli",
            "--no-dtls",
            "--min-port",
            "40000",
            "--max-port",
            "49999",
        ])
        .args(["--log-file", "stdout", "--simple-log", "--no-stun-backward-compatibility"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start turnserver (apt-get install coturn)");
    KillOnDrop(child)
}
