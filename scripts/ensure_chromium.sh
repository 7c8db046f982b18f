#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the browser test (tests/test_browser.py),
# g++ for the compiled kernel's tests and Debian's Fashion-MNIST for the data tests.
#
# The test drives the system Chromium with Playwright; it never downloads a browser.
# - chromium already on PATH: nothing to do.
# - running as root with apt-get: `apt-get install -y chromium`.
# - otherwise: print how to install it.
# Exits 0 unless CI=true and Chromium could not be made available.
set -u

# The compiled sparsity kernel (xai_sparsity.kernels, kernel="compiled") needs a C++ compiler for
# torch.compile on CPU; its tests skip without one. Install g++ too where we can.
if ! command -v g++ >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing g++ with apt-get (for the compiled kernel's tests) ..."
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ || echo "g++ not installed" >&2
fi

# Debian's Fashion-MNIST (70,000 real images, IDX .gz; no download at run time) for the data
# tests and the study. Where it cannot be installed those tests skip and say how to enable it.
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's dataset-fashion-mnist with apt-get (data tests, study) ..."
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist || \
        echo "dataset-fashion-mnist not installed" >&2
fi

find_chromium() {
    command -v chromium || command -v chromium-browser || true
}

if [ -n "$(find_chromium)" ]; then
    echo "chromium: $(find_chromium)"
    exit 0
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium with apt-get ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium
fi

if [ -n "$(find_chromium)" ]; then
    echo "chromium: $(find_chromium)"
    exit 0
fi

echo "chromium is not installed; the browser test will be skipped." >&2
echo "Install it with:  sudo apt-get install -y chromium   (Debian/Ubuntu)" >&2
echo "or run this script as root: sudo scripts/ensure_chromium.sh" >&2
if [ "${CI:-}" = "true" ]; then
    echo "CI=true: the browser test must run, so this is an error." >&2
    exit 1
fi
exit 0
