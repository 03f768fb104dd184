# shellcheck shell=bash
# shellcheck disable=SC2034 # these variables are used by the scripts that source this file
# Shared by deploy/local/up and deploy/local/down (sourced, not run).
# Layout of the local stack's state (all git-ignored):
#   .local/stack/synapse/       Synapse config, SQLite DB, homeserver.log
#   .local/stack/switchboard/   switchboard.toml, registration.yaml, switchboard.db
#   .local/stack/logs/          stdout/stderr of both processes
#   .local/stack/run/           pid files
#   .local/stack/{alice,bob}.*  the demo peers: key, localpart, password, access token, user id

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="$REPO/.local/stack"
SYNAPSE_DIR="$STATE/synapse"
SB_DIR="$STATE/switchboard"
LOGS="$STATE/logs"
RUN="$STATE/run"
VENV="$REPO/.cache/synapse-venv"

SYNAPSE_URL="http://127.0.0.1:8008"
SB_CLIENT_URL="http://127.0.0.1:9331"
SB_APPSERVICE_URL="http://127.0.0.1:9330"
SB_OPS_URL="http://127.0.0.1:9332"

# What each service's command line must contain, so a reused pid is not mistaken for ours.
declare -A MATCH=([synapse]="synapse.app.homeserver" [switchboard]="switchboard serve")

# Prints the pid of service $1 if its pid file names a live process of that service.
live_pid() {
    local file="$RUN/$1.pid" pid
    [[ -f "$file" ]] || return 1
    pid="$(<"$file")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "${MATCH[$1]}" || return 1
    echo "$pid"
}

# SIGTERM service $1, wait up to $2 seconds, then SIGKILL; removes its pid file.
stop_service() {
    local name="$1" timeout="${2:-20}" pid i
    if pid="$(live_pid "$name")"; then
        echo "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < timeout * 10; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$name did not stop within ${timeout}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$RUN/$name.pid"
}
