#!/usr/bin/env bash
# Install the system packages that the system tests use (called by `make test`, which passes
# its SYSTEM_TEST_PACKAGES; without arguments, the same default list):
#
#   chromium                                   headless browser tests of the HTML reports
#   slurmctld slurmd slurm-client munge        the real single-node SLURM test (scripts/slurm/)
#   graphviz                                   only if the code draws Nipype graphs (write_graph)
#
# Installs only as root where apt-get exists (a CI machine, a container); anywhere else it says
# what it skipped and why, and the tests that need these packages skip with a reason.
# Idempotent: returns at once when everything is installed.
# CMB_REQUIRE_SYSTEM_DEPS=1 turns "could not install" into an error (for CI).
set -euo pipefail

cd "$(dirname "$0")/.."
if [ "$#" -gt 0 ]; then
    packages=("$@")
else
    packages=(chromium slurmctld slurmd slurm-client munge)
fi
if grep -rqs "write_graph" cmb_bidsapp; then
    packages+=(graphviz)
fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("${pkg}")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "system test dependencies: all present (${packages[*]})"
    exit 0
fi

give_up() {
    echo "system test dependencies: SKIPPED installing ${missing[*]}: $1" >&2
    echo "  the tests marked 'browser' and 'slurm' will be skipped with this reason." >&2
    if [ "${CMB_REQUIRE_SYSTEM_DEPS:-0}" = "1" ]; then
        exit 1
    fi
    exit 0
}

if [ "$(id -u)" != "0" ]; then
    give_up "not root (run: sudo $0)"
fi
if ! command -v apt-get > /dev/null 2>&1; then
    give_up "apt-get not found (not a Debian-like system); install them with your package manager"
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    # wait for another apt/dpkg (another job on the same machine) instead of failing
    apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "${missing[@]}"
}
echo "system test dependencies: installing ${missing[*]}"
if ! ls /var/lib/apt/lists/*_Packages > /dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=300 update -qq || give_up "apt-get update failed (network?)"
fi
if ! apt_install > /tmp/cmb-apt-install.log 2>&1; then
    apt-get -o DPkg::Lock::Timeout=300 update -qq || give_up "apt-get update failed (network?)"
    apt_install > /tmp/cmb-apt-install.log 2>&1 \
        || { tail -n 20 /tmp/cmb-apt-install.log >&2; give_up "apt-get install failed (see above)"; }
fi
echo "system test dependencies: installed ${missing[*]}"
