//! The command line: init, registration, config check/example, migrate, identity.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn switchboard(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchboard")).args(args).envs(envs.iter().copied()).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn init(dir: &Path) -> Output {
    switchboard(
        &[
            "init",
            "--server-name",
            "example.org",
            "--homeserver-url",
            "http://127.0.0.1:8008",
            "--dir",
            dir.to_str().unwrap(),
        ],
        &[],
    )
}

#[test]
fn init_writes_a_valid_config_and_registration_with_fresh_secrets_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = init(dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config_path = dir.path().join("switchboard.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let registration = std::fs::read_to_string(dir.path().join("registration.yaml")).unwrap();
    assert!(!config.contains("CHANGE-ME"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&config_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the config holds secrets: owner-only");
    }

    // `registration -c` prints exactly what init wrote, with the tokens of the config.
    let printed = switchboard(&["registration", "-c", config_path.to_str().unwrap()], &[]);
    assert!(printed.status.success());
    assert_eq!(text(&printed.stdout), registration);
    let parsed = switchboard::config::Config::load(&config_path).unwrap();
    assert!(registration.contains(&format!("as_token: '{}'", parsed.as_token().expose())));
    assert!(registration.contains(&format!("hs_token: '{}'", parsed.hs_token().expose())));
    assert!(registration.contains(r"regex: '@0x[0-9a-fA-F]{40}(\.[0-9a-f]{8})?:example\.org'"));
    assert!(registration.contains("receive_ephemeral: true"));
    assert!(registration.contains("de.sorunome.msc2409.push_ephemeral: true"));
    assert!(registration.contains("rate_limited: false"));

    // A second init never overwrites, and a second directory gets different secrets.
    let again = init(dir.path());
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already exists"), "{}", text(&again.stderr));
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), config);
    let other = tempfile::tempdir().unwrap();
    assert!(init(other.path()).status.success());
    let other_config = switchboard::config::Config::load(&other.path().join("switchboard.toml")).unwrap();
    assert_ne!(other_config.as_token().expose(), parsed.as_token().expose());
    assert_ne!(other_config.hs_token().expose(), parsed.hs_token().expose());

    let check = switchboard(&["config", "check", "-c", config_path.to_str().unwrap()], &[]);
    assert!(check.status.success(), "{}", text(&check.stderr));
}

#[test]
fn config_example_is_the_committed_example_and_checks_clean() {
    let out = switchboard(&["config", "example"], &[]);
    assert!(out.status.success());
    let committed = std::fs::read_to_string(common::repo_root().join("switchboard.example.toml")).unwrap();
    assert_eq!(text(&out.stdout), committed);
    let path = common::repo_root().join("switchboard.example.toml");
    let check = switchboard(&["config", "check", "-c", path.to_str().unwrap()], &[]);
    assert!(check.status.success(), "{}", text(&check.stderr));
}

#[test]
fn config_errors_name_the_key_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let example = std::fs::read_to_string(common::repo_root().join("switchboard.example.toml")).unwrap();
    std::fs::write(&path, example.replace("max_connections = 8", "max_connections = \"eight\"")).unwrap();
    let out = switchboard(&["config", "check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("max_connections"), "{}", text(&out.stderr));

    // Environment overrides apply (SWITCHBOARD_<SECTION>__<KEY>) and are validated like the file.
    std::fs::write(&path, &example).unwrap();
    let out = switchboard(
        &["config", "check", "-c", path.to_str().unwrap()],
        &[("SWITCHBOARD_DATABASE__URL", "mysql://nope")],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("database.url"), "{}", text(&out.stderr));
    let out = switchboard(
        &["config", "check", "-c", path.to_str().unwrap()],
        &[
            ("SWITCHBOARD_DATABASE__URL", "postgres://db.internal/switchboard"),
            ("SWITCHBOARD_UNRELATED", "x"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = switchboard(&["config", "check", "-c", dir.path().join("missing.toml").to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("missing.toml"), "{}", text(&out.stderr));
}

#[test]
fn migrate_creates_the_sqlite_database_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    assert!(init(dir.path()).status.success());
    let config = dir.path().join("switchboard.toml");
    let db = dir.path().join("state.db");
    let db_url = format!("sqlite://{}", db.display());
    for _ in 0..2 {
        let out = switchboard(
            &["migrate", "-c", config.to_str().unwrap()],
            &[("SWITCHBOARD_DATABASE__URL", &db_url)],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert!(db.exists(), "the SQLite file is created when missing");
}

#[tokio::test]
async fn identity_new_writes_a_private_key_and_publish_proves_it_on_a_real_synapse() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("alice.key");
    let key_arg = key_file.to_str().unwrap();
    let created = switchboard(&["identity", "new", "--key-file", key_arg], &[]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let localpart = text(&created.stdout).trim().to_owned();
    assert!(localpart.starts_with("0x") && localpart.len() == 42, "{localpart}");
    let again = switchboard(&["identity", "new", "--key-file", key_arg], &[]);
    assert!(!again.status.success(), "an existing key file is never overwritten");
    assert!(text(&again.stderr).contains("alice.key"), "{}", text(&again.stderr));

    // No token: a clear error, not a prompt or a panic.
    let no_token = switchboard(
        &["identity", "publish", "--homeserver", "http://127.0.0.1:9", "--key-file", key_arg],
        &[("SWITCHBOARD_PEER_TOKEN", "")],
    );
    assert!(!no_token.status.success());
    assert!(text(&no_token.stderr).contains("access token"), "{}", text(&no_token.stderr));

    let Some(synapse) = common::Synapse::start(&[]).await else { return };
    let user = synapse.register(&localpart).await;
    let token_file = dir.path().join("alice.token");
    std::fs::write(&token_file, format!("{}\n", user.access_token)).unwrap();
    let published = tokio::task::spawn_blocking({
        let (base_url, key, token) = (synapse.base_url.clone(), key_arg.to_owned(), token_file.clone());
        move || {
            let token = token.to_str().unwrap().to_owned();
            let args = [
                "identity",
                "publish",
                "--homeserver",
                &base_url,
                "--key-file",
                &key,
                "--access-token-file",
                &token,
            ];
            switchboard(&args, &[])
        }
    })
    .await
    .unwrap();
    assert!(published.status.success(), "{}", text(&published.stderr));
    assert_eq!(text(&published.stdout).trim(), user.user_id);
    let profile: serde_json::Value = reqwest::get(format!(
        "{}/_matrix/client/v3/profile/{}",
        synapse.base_url,
        common::urlencode(&user.user_id)
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let displayname = profile["displayname"].as_str().unwrap();
    let proven = switchboard::directory::identity::verify_displayname(&user.user_id, displayname).unwrap();
    assert_eq!(proven.to_lower_hex(), localpart);
    assert_eq!(
        profile["avatar_url"],
        format!("mxc://raiden.network/cap?{}", switchboard::client::identity::DEFAULT_CAPABILITIES)
    );
}
