# Sourced by the scripts: create or reuse .venv and install the project into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

ensure_venv() {
    local base="${PYTHON:-python3}"
    if [ ! -x "$PY" ]; then
        if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "error: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
            exit 1
        fi
        echo "creating virtual environment in $VENV" >&2
        "$base" -m venv "$VENV"
    fi
    local stamp="$VENV/.installed"
    local want
    want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "installing balancer and its dependencies into $VENV" >&2
        "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >&2
        "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]" >&2
        echo "$want" > "$stamp"
    fi
}

# The compiled extensions, rebuilt in place where a source changed since the last build
# (pip install -e builds them once; this keeps them current after edits). A build that
# fails leaves the pure Python implementation running; `balancer --version` says which.
ensure_extensions() {
    echo "building the compiled extensions (up to date ones are skipped)" >&2
    (cd "$ROOT" && "$PY" setup.py -q build_ext --inplace >&2)
}

# Real peers for tests and benchmarks, from Debian packages.
PEER_PACKAGES=(redis-server redis-tools haproxy wrk nginx-light chromium dnsmasq etcd-server iproute2)
PEER_BINARIES=(redis-server redis-benchmark haproxy wrk nginx chromium dnsmasq etcd ip)

ensure_peers() {
    local missing=()
    local i
    for i in "${!PEER_BINARIES[@]}"; do
        if ! command -v "${PEER_BINARIES[$i]}" >/dev/null 2>&1 \
            && [ ! -x "/usr/sbin/${PEER_BINARIES[$i]}" ]; then
            missing+=("${PEER_PACKAGES[$i]}")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing test peers: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
        # the packages' own services are not wanted: tests start their own on free ports
        for svc in redis-server nginx haproxy dnsmasq etcd; do
            (service "$svc" stop || true) >/dev/null 2>&1
        done
    else
        echo "error: missing test peers; install them with:" >&2
        echo "  sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
}
