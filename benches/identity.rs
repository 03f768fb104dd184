//! Displayname signature recoveries per second: Switchboard (k256) against eth-account (Python, the
//! implementation Raiden's tooling uses) in the same run, on the same signed user ids.
//!
//! Run: `tests/python-tools && cargo bench --bench identity`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use switchboard::directory::identity::verify_displayname;

const USERS: u32 = 200;

/// Signs USERS user ids, then times eth-account's own recovery of all of them (best of 3 passes).
const REFERENCE: &str = r#"
import json, sys, time
from eth_account import Account
from eth_account.messages import encode_defunct
users = []
for _ in range(int(sys.argv[1])):
    account = Account.create()
    user_id = f"@{account.address.lower()}:localhost"
    signature = "0x" + Account.sign_message(encode_defunct(text=user_id), account.key).signature.hex().removeprefix("0x")
    users.append((user_id, signature, account.address))
best = None
for _ in range(3):
    started = time.perf_counter()
    for user_id, signature, address in users:
        assert Account.recover_message(encode_defunct(text=user_id), signature=signature) == address
    elapsed = time.perf_counter() - started
    best = elapsed if best is None else min(best, elapsed)
print(json.dumps({"users": users, "seconds": best}))
"#;

fn main() {
    let python = std::env::var_os("SWITCHBOARD_TEST_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/test-venv/bin/python"),
        PathBuf::from,
    );
    let output = Command::new(&python).args(["-c", REFERENCE, &USERS.to_string()]).output();
    let output = match output {
        Ok(output) if output.status.success() => output,
        _ => {
            eprintln!("needs eth-account: run tests/python-tools (looked for {})", python.display());
            return;
        }
    };
    let reference: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let users: Vec<(String, String)> = reference["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u[0].as_str().unwrap().to_owned(), u[1].as_str().unwrap().to_owned()))
        .collect();
    let python_per_s = f64::from(USERS) / reference["seconds"].as_f64().unwrap();

    // Best of 5 passes over 10 rounds of the same users, on one thread.
    let mut best = f64::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..10 {
            for (user_id, signature) in &users {
                assert!(verify_displayname(user_id, signature).is_ok());
            }
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    let rust_per_s = f64::from(USERS * 10) / best;
    println!(
        "\n{USERS} Raiden user ids signed by eth-account; displayname verifications per second, one thread\n"
    );
    println!("| implementation | verifications/s | µs each |");
    println!("|---|---:|---:|");
    println!("| Switchboard (k256 + sha3) | {rust_per_s:.0} | {:.1} |", 1e6 / rust_per_s);
    println!("| eth-account 0.14 (Python) | {python_per_s:.0} | {:.1} |", 1e6 / python_per_s);
    println!("\nratio Switchboard / eth-account: {:.1}×", rust_per_s / python_per_s);
}
