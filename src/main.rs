//! The `switchboard` binary: parses the command line, sets up logging and hands over to the library.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rand::Rng as _;
use switchboard::config::{self, Config, Rendered};
use switchboard::{Listeners, appservice, store::Store, telemetry};
use tokio_util::sync::CancellationToken;

/// Exit code for an invalid configuration (sysexits' EX_CONFIG).
const EXIT_CONFIG: u8 = 78;
/// Exit code when a second signal cuts shutdown short (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: i32 = 130;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Matrix appservice brokering WebRTC upgrades for Raiden")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new switchboard.toml (with fresh secrets) and registration.yaml.
    Init {
        /// The homeserver's server_name.
        #[arg(long)]
        server_name: String,
        /// Where Switchboard reaches the homeserver's client API.
        #[arg(long)]
        homeserver_url: String,
        /// Folder to write into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Print the registration YAML for the homeserver.
    Registration {
        #[arg(short, long, env = "SWITCHBOARD_CONFIG", default_value = "switchboard.toml")]
        config: PathBuf,
    },
    /// Check or print configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Apply pending database migrations.
    Migrate {
        #[arg(short, long, env = "SWITCHBOARD_CONFIG", default_value = "switchboard.toml")]
        config: PathBuf,
    },
    /// Raiden identities for the thin client and `deploy/local/up`'s demo peers.
    #[cfg(feature = "client")]
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// A command-line peer to check a deployment end to end: run it twice, one `--listen`, one
    /// `--to ADDRESS`; prints the path, the upgrade time and round-trip times.
    #[cfg(feature = "client")]
    Peer(PeerArgs),
    /// Run the service.
    Serve {
        #[arg(short, long, env = "SWITCHBOARD_CONFIG", default_value = "switchboard.toml")]
        config: PathBuf,
        /// Do not apply pending migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
}

/// `switchboard peer --fallback`.
#[cfg(feature = "client")]
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FallbackArg {
    ToDevice,
    Room,
}

#[cfg(feature = "client")]
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["listen", "to"])))]
struct PeerArgs {
    /// The homeserver's client API, e.g. http://127.0.0.1:8008.
    #[arg(long)]
    homeserver: url::Url,
    /// A file holding the user's access token (else SWITCHBOARD_PEER_TOKEN).
    #[arg(long)]
    access_token_file: Option<PathBuf>,
    /// Switchboard's client API; discovered from the homeserver's well-known when not given.
    #[arg(long)]
    switchboard: Option<url::Url>,
    /// Wait for peers and echo what they send.
    #[arg(long)]
    listen: bool,
    /// Open a data channel to this address and send to it.
    #[arg(long, value_name = "ADDRESS")]
    to: Option<String>,
    /// Messages to send (--to; default 100), or to echo before exiting (--listen; default 0: until
    /// the timeout).
    #[arg(long)]
    count: Option<usize>,
    /// Bytes per message (Raiden-shaped JSON text padded to the size).
    #[arg(long, default_value_t = 3200)]
    size: usize,
    /// Seconds the whole run may take (0 with --listen: until interrupted).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Relay-only ICE: every channel through TURN (checks the relay).
    #[arg(long)]
    relay_only: bool,
    /// The Matrix path of messages without a data channel: to-device (Raiden 3.x) or a private
    /// room per pair.
    #[arg(long, value_enum, default_value_t = FallbackArg::ToDevice)]
    fallback: FallbackArg,
    /// Publish this key's Raiden profile (displayname and capabilities) before connecting.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// End with one JSON line: path, upgrade_ms, rtt_ms {p50, p99}, sent, acknowledged, received.
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "client")]
#[derive(Subcommand)]
enum IdentityCommand {
    /// Generate a secp256k1 key into a new file (mode 0600, never overwritten) and print the Matrix
    /// localpart a Raiden node registers under: `0x` and the lower-case address.
    New {
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Publish the key's Raiden profile for the user of an access token: the displayname that
    /// proves the address (personal_sign of the user id) and the capabilities; print the user id.
    Publish {
        /// The homeserver's client API, e.g. http://127.0.0.1:8008.
        #[arg(long)]
        homeserver: url::Url,
        #[arg(long)]
        key_file: PathBuf,
        /// A file holding the user's access token (else SWITCHBOARD_PEER_TOKEN).
        #[arg(long)]
        access_token_file: Option<PathBuf>,
        /// The capabilities to announce, as Raiden writes them in its avatar URL.
        #[arg(long, default_value = switchboard::client::identity::DEFAULT_CAPABILITIES)]
        capabilities: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate a configuration file; errors name the key.
    Check {
        #[arg(short, long, env = "SWITCHBOARD_CONFIG", default_value = "switchboard.toml")]
        config: PathBuf,
    },
    /// Print a fully commented example configuration.
    Example,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.downcast_ref::<config::ConfigError>().is_some() => {
            eprintln!("switchboard: invalid configuration: {error:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(error) => {
            eprintln!("switchboard: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init { server_name, homeserver_url, dir } => init(&server_name, &homeserver_url, &dir),
        Command::Registration { config } => {
            print!("{}", appservice::registration::render(&Config::load(&config)?));
            Ok(())
        }
        Command::Config { command: ConfigCommand::Check { config } } => {
            Config::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Config { command: ConfigCommand::Example } => {
            print!("{}", config::render(&Rendered::EXAMPLE));
            Ok(())
        }
        Command::Migrate { config } => {
            let config = Config::load(&config)?;
            runtime()?.block_on(async {
                let store = Store::connect(config.database_url(), 1).await?;
                store.migrate().await?;
                store.close().await;
                anyhow::Ok(())
            })?;
            println!("migrations applied");
            Ok(())
        }
        #[cfg(feature = "client")]
        Command::Identity { command } => identity(command),
        #[cfg(feature = "client")]
        Command::Peer(args) => peer(args),
        Command::Serve { config, no_migrate } => {
            let mut config = Config::load(&config)?;
            if no_migrate {
                config.database.migrate_on_start = false;
            }
            telemetry::init(&config.log);
            raise_open_files_limit();
            runtime()?.block_on(serve(config))
        }
    }
}

/// Raises the soft limit of open files to the hard one, as Go programs and nginx do: every TURN
/// client over TCP or TLS, every relay socket and every HTTP connection takes a descriptor, and
/// systemd's default soft limit (1024) would let a few hundred of them starve all listeners.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "switchboard.start: open files limit"),
        Err(error) => tracing::warn!(%error, "switchboard.start: cannot raise the open files limit"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    switchboard::run(config, listeners, shutdown).await?;
    Ok(())
}

/// SIGTERM or SIGINT: stop accepting, finish in-flight work, exit 0. A second signal exits at once.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("switchboard.stop: SIGTERM received; finishing in-flight requests"),
        _ = int.recv() => tracing::info!("switchboard.stop: SIGINT received; finishing in-flight requests"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("switchboard.stop: second signal; exiting without waiting");
    std::process::exit(EXIT_INTERRUPTED);
}

#[cfg(feature = "client")]
fn identity(command: IdentityCommand) -> anyhow::Result<()> {
    use switchboard::client::{identity, matrix};
    match command {
        IdentityCommand::New { key_file } => {
            let key = identity::RaidenKey::create(&key_file)?;
            eprintln!("wrote the key of {} to {}", key.address().to_checksum(), key_file.display());
            println!("{}", key.localpart());
            Ok(())
        }
        IdentityCommand::Publish { homeserver, key_file, access_token_file, capabilities } => {
            let key = identity::RaidenKey::load(&key_file)?;
            let token = access_token(access_token_file.as_deref())?;
            let client = matrix::MatrixClient::new(&homeserver, token, matrix::Settings::default())?;
            let user_id = runtime()?.block_on(identity::publish(&client, &key, &capabilities))?;
            println!("{user_id}");
            Ok(())
        }
    }
}

#[cfg(feature = "client")]
fn peer(args: PeerArgs) -> anyhow::Result<()> {
    use switchboard::client::{ClientConfig, identity, matrix, peer};
    let token = access_token(args.access_token_file.as_deref())?;
    let mode = match args.to {
        Some(address) => peer::Mode::To(address),
        None => peer::Mode::Listen,
    };
    let count = args.count.unwrap_or(if matches!(mode, peer::Mode::To(_)) { 100 } else { 0 });
    let options = peer::PeerOptions {
        mode,
        count,
        size: args.size,
        timeout: std::time::Duration::from_secs(args.timeout),
    };
    let mut config = ClientConfig::new(args.homeserver.clone(), token.clone());
    config.switchboard = args.switchboard;
    config.relay_only = args.relay_only;
    config.fallback = match args.fallback {
        FallbackArg::ToDevice => switchboard::client::Fallback::ToDevice,
        FallbackArg::Room => switchboard::client::Fallback::Room,
    };
    let json = args.json;
    runtime()?.block_on(async move {
        if let Some(key_file) = &args.key_file {
            let key = identity::RaidenKey::load(key_file)?;
            let matrix = matrix::MatrixClient::new(&args.homeserver, token, matrix::Settings::default())?;
            identity::publish(&matrix, &key, identity::DEFAULT_CAPABILITIES).await?;
            eprintln!("published the Raiden profile of {}", key.address().to_checksum());
        }
        let result = peer::run(config, &options, |line| eprintln!("{line}")).await;
        let (report, error) = match result {
            Ok(report) => (report, None),
            Err((error, report)) => (report, Some(error)),
        };
        if json {
            println!("{}", serde_json::to_string(&report)?);
        }
        match error {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
    })
}

/// The access token from `file` (its first line), else from `SWITCHBOARD_PEER_TOKEN`; never from
/// the command line, where other users of the machine could read it.
#[cfg(feature = "client")]
fn access_token(file: Option<&Path>) -> anyhow::Result<String> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the access token from {}", path.display()))?,
        None => std::env::var("SWITCHBOARD_PEER_TOKEN")
            .context("no access token: give --access-token-file or set SWITCHBOARD_PEER_TOKEN")?,
    };
    let token = token.lines().next().unwrap_or_default().trim().to_owned();
    if token.is_empty() {
        bail!("the access token is empty");
    }
    Ok(token)
}

fn init(server_name: &str, homeserver_url: &str, dir: &Path) -> anyhow::Result<()> {
    let config_path = dir.join("switchboard.toml");
    let registration_path = dir.join("registration.yaml");
    for path in [&config_path, &registration_path] {
        if path.exists() {
            bail!("{} already exists; not overwriting it", path.display());
        }
    }
    let (as_token, hs_token, turn_shared_secret) = (random_secret(), random_secret(), random_secret());
    let text = config::render(&Rendered {
        server_name,
        homeserver_url,
        as_token: &as_token,
        hs_token: &hs_token,
        turn_shared_secret: &turn_shared_secret,
    });
    // Validate before writing anything, so a bad server name or URL leaves no files behind.
    let config = Config::from_toml_str(&text)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_new_private(&config_path, &text)?;
    write_new_private(&registration_path, &appservice::registration::render(&config))?;
    println!("wrote {} and {}", config_path.display(), registration_path.display());
    println!(
        "add {} to the homeserver's app_service_config_files, then run: switchboard serve -c {}",
        registration_path.display(),
        config_path.display()
    );
    Ok(())
}

/// Writes a file that must not exist yet, readable by its owner only (it holds secrets).
fn write_new_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

fn random_secret() -> String {
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(64).map(char::from).collect()
}
