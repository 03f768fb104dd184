//! Signature recovery agrees with an independent implementation: eth-account (Python) signs Raiden
//! user ids the way Raiden nodes do, and Switchboard must recover the same addresses.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use switchboard::directory::identity::{
    Address, IdentityError, SignatureError, recover_signer, verify_displayname,
};

/// Signs 40 user ids (half with the optional 8-hex suffix) with fresh keys, plus each with a second key.
const SIGNER: &str = r#"
import json, secrets
from eth_account import Account
from eth_account.messages import encode_defunct

def sign(text, key):
    signature = Account.sign_message(encode_defunct(text=text), key).signature.hex()
    return "0x" + signature.removeprefix("0x")

out = []
for i in range(40):
    user, impostor = Account.create(), Account.create()
    suffix = "." + secrets.token_hex(4) if i % 2 else ""
    user_id = f"@{user.address.lower()}{suffix}:localhost"
    out.append({
        "user_id": user_id,
        "address": user.address,
        "signature": sign(user_id, user.key),
        "impostor": impostor.address,
        "impostor_signature": sign(user_id, impostor.key),
    })
print(json.dumps(out))
"#;

#[derive(Deserialize)]
struct Signed {
    user_id: String,
    address: String,
    signature: String,
    impostor: String,
    impostor_signature: String,
}

fn eth_account_python() -> Option<PathBuf> {
    let python = std::env::var_os("SWITCHBOARD_TEST_PYTHON")
        .map_or_else(|| common::repo_root().join(".cache/test-venv/bin/python"), PathBuf::from);
    python.exists().then_some(python)
}

#[test]
fn recovered_addresses_match_eth_account() {
    let Some(python) = eth_account_python() else {
        common::skip("no test venv with eth-account (tests/python-tools creates .cache/test-venv)");
        return;
    };
    let output = Command::new(python).args(["-c", SIGNER]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let cases: Vec<Signed> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(cases.len(), 40);
    for case in &cases {
        // The user's own signature verifies, and the checksummed address matches eth-account's.
        let address = verify_displayname(&case.user_id, &case.signature)
            .unwrap_or_else(|e| panic!("{}: {e}", case.user_id));
        assert_eq!(address.to_checksum(), case.address);
        assert_eq!(Address::parse(&case.address).unwrap(), address);

        // Signed by another key: recovered as that key, never as the user.
        let impostor = verify_displayname(&case.user_id, &case.impostor_signature).unwrap_err();
        let expected = Address::parse(&case.impostor).unwrap();
        assert_eq!(impostor, IdentityError::Mismatch { claimed: address, recovered: expected });

        // Mangled signatures are typed errors, never a wrong address.
        let sig = &case.signature;
        let message = case.user_id.as_bytes();
        assert_eq!(recover_signer(message, &sig[..sig.len() - 2]), Err(SignatureError::Malformed));
        assert_eq!(recover_signer(message, &sig[2..]), Err(SignatureError::Malformed));
        assert_eq!(
            recover_signer(message, &format!("{}zz", &sig[..sig.len() - 2])),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            recover_signer(message, &format!("{}1d", &sig[..sig.len() - 2])),
            Err(SignatureError::BadV(29))
        );
        assert_eq!(
            recover_signer(message, &format!("{}01", &sig[..sig.len() - 2])),
            Err(SignatureError::BadV(1))
        );
        // Another message (a different server) does not recover the user.
        let elsewhere = case.user_id.replace(":localhost", ":elsewhere");
        assert!(matches!(verify_displayname(&elsewhere, sig), Err(IdentityError::Mismatch { .. })));
    }
}
