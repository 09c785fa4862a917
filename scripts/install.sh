#!/usr/bin/env bash
# Installs what autonat and its lab need, idempotently: Debian packages (only the missing ones) and the
# Python package with its test tools in ./.venv. Safe to run again; quick when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (the lab needs network namespaces and nftables)" >&2
    exit 1
fi

# miniupnpd-nftables: the real router; miniupnpc/natpmpc: independent reference clients;
# stun-server: lets miniupnpd learn its WAN address; socat/tcpdump: lab traffic checks;
# sip-tester: SIPp, the reference SIP caller/phone of the lab tests (tests/lab/sipp/);
# openssl: a throw-away certificate for the SIP-over-TLS test; sipvicious: the scanner/password cracker
# that sweeps port 5060 on the internet (abuse tests); fail2ban: fail2ban-regex checks the shipped filter;
# baresip-core: a real phone (plain RTP, ICE, rtcp-mux, hold) and kamailio: a real registrar/proxy, for the
# call-control lab tests (tests/lab/test_phones.py); chromium: the headless browser that loads the status page
# and prometheus: its promtool checks the /metrics scrape (tests/lab/test_web.py, tests/unit/test_web_server.py).
packages=(iproute2 nftables miniupnpd-nftables miniupnpc natpmpc stun-server socat tcpdump sip-tester openssl
          procps util-linux sipvicious fail2ban baresip-core kamailio chromium prometheus)
if ! command -v python3 >/dev/null || ! python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    packages+=(python3 python3-venv python3-pip)
fi
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps apt from starting miniupnpd as a service; the lab runs it itself.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.autonat-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
# Put `autonat` on the PATH unless something else already owns that name.
if [ ! -e /usr/local/bin/autonat ] || [ "$(readlink /usr/local/bin/autonat)" = "$PWD/.venv/bin/autonat" ]; then
    ln -sf "$PWD/.venv/bin/autonat" /usr/local/bin/autonat
fi
