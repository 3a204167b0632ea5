#!/usr/bin/env bash
# Container entrypoint for both images: runs `adapter-server serve`, configured by environment.
#
#   (no arguments) | --flag ...   exec adapter-server serve [--flag ...]
#   SUBCOMMAND ...                exec adapter-server SUBCOMMAND ...   (e.g. `adapters list`)
#   --print-command [args ...]    print what would be exec'd and the ADAPTER_SERVER_* settings
#                                 it runs with (admin token: its length only), then exit
#
# Every serve option comes from its ADAPTER_SERVER_<OPTION> variable (e.g. ADAPTER_SERVER_PORT,
# ADAPTER_SERVER_MAX_BATCH), which `serve` reads itself, so flags and variables cannot drift
# apart; a flag given as an argument wins over the variable.
# ADAPTER_SERVER_ADMIN_TOKEN_FILE names a file holding the admin token (a Docker or Kubernetes
# secret), so the token shows neither in `docker inspect` nor in the process list.
set -euo pipefail

print_only=0
if [[ "${1:-}" == "--print-command" ]]; then
    print_only=1
    shift
fi

die() { echo "entrypoint: $*" >&2; exit 2; }

if [[ -n "${ADAPTER_SERVER_ADMIN_TOKEN_FILE:-}" ]]; then
    [[ -z "${ADAPTER_SERVER_ADMIN_TOKEN:-}" ]] \
        || die "set ADAPTER_SERVER_ADMIN_TOKEN or ADAPTER_SERVER_ADMIN_TOKEN_FILE, not both"
    [[ -r "$ADAPTER_SERVER_ADMIN_TOKEN_FILE" ]] \
        || die "ADAPTER_SERVER_ADMIN_TOKEN_FILE=$ADAPTER_SERVER_ADMIN_TOKEN_FILE is not a readable file"
    token="$(<"$ADAPTER_SERVER_ADMIN_TOKEN_FILE")"
    token="${token%$'\n'}"    # secrets written with `echo` end in a newline
    [[ -n "$token" ]] || die "ADAPTER_SERVER_ADMIN_TOKEN_FILE=$ADAPTER_SERVER_ADMIN_TOKEN_FILE is empty"
    export ADAPTER_SERVER_ADMIN_TOKEN="$token"
fi
unset ADAPTER_SERVER_ADMIN_TOKEN_FILE   # not a serve option: serve must not see it

if [[ $# -eq 0 || "$1" == -* ]]; then
    cmd=(adapter-server serve "$@")
    # The commonest container mistake: a volume owned by another uid. Say so before the model
    # loads (minutes for 7B) instead of failing at the first upload.
    if [[ -n "${ADAPTER_SERVER_STORE:-}" ]]; then
        dir="$ADAPTER_SERVER_STORE"    # the store creates missing folders: check the nearest existing one
        while [[ ! -e "$dir" && "$dir" != "/" && "$dir" != "." ]]; do dir="$(dirname "$dir")"; done
        [[ -d "$dir" && -w "$dir" ]] || die "adapter store $ADAPTER_SERVER_STORE: $dir is not a" \
            "directory writable by uid $(id -u); chown the volume to it (Kubernetes: securityContext.fsGroup)"
    fi
else
    cmd=(adapter-server "$@")
fi

if (( print_only )); then
    printf '%q ' "${cmd[@]}"
    echo
    env | LC_ALL=C sort | while IFS='=' read -r name value; do
        case "$name" in
            ADAPTER_SERVER_ADMIN_TOKEN) echo "$name=<redacted, ${#value} characters>" ;;
            ADAPTER_SERVER_*) echo "$name=$value" ;;
        esac
    done
    exit 0
fi
exec "${cmd[@]}"
