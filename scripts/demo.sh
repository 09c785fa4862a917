#!/usr/bin/env bash
# Installs everything, then runs the main job in the lab: a real router (miniupnpd) in network
# namespaces, autonat on the LAN host behind it, and the internet host checking from outside.
#   ./scripts/demo.sh          # the lab is torn down at the end
#   KEEP_LAB=1 ./scripts/demo.sh   # leave it up to explore: autonat lab exec lan -- autonat probe
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh

autonat=$PWD/.venv/bin/autonat
python=$PWD/.venv/bin/python
traffic=$PWD/tests/lab/traffic.py
prefix=demo
export AUTONAT_STATE_DIR=/run/autonat-demo-state

cleanup() {
    "$autonat" -q lab --prefix "$prefix" down >/dev/null 2>&1 || true
    rm -rf "$AUTONAT_STATE_DIR"
}
[ "${KEEP_LAB:-}" = 1 ] || trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
lan() { "$autonat" lab --prefix "$prefix" exec lan -- "$@"; }
wan() { "$autonat" lab --prefix "$prefix" exec wan -- "$@"; }

step "Bring up the lab (wan 203.0.113.0/24 | router: miniupnpd | lan 192.168.77.0/24)"
"$autonat" lab --prefix "$prefix" up

step "autonat probe, on the LAN host"
lan "$autonat" probe

for protocol in pcp natpmp upnp; do
    step "autonat map add 5060 udp --protocol $protocol"
    external=$(lan "$autonat" map add 5060 udp --protocol "$protocol" | head -n 1)
    echo "mapped to $external"
    step "upnpc (independent client) lists the router's table"
    lan upnpc -u http://192.168.77.1:5000/rootDesc.xml -l | grep -E '^ *[0-9]+ (UDP|TCP)' || true
    step "a datagram from the internet host to $external reaches the LAN host"
    lan "$python" "$traffic" listen udp 5060 3 > /tmp/autonat-demo-listen.$$ &
    listener=$!
    sleep 0.3
    wan "$python" "$traffic" send udp "${external%:*}" "${external#*:}" "hello through the NAT via $protocol"
    if wait "$listener"; then echo "received: $(tail -n 1 /tmp/autonat-demo-listen.$$)"; else echo "NOT received"; exit 1; fi
    rm -f /tmp/autonat-demo-listen.$$
    step "autonat map del 5060 udp --protocol $protocol"
    lan "$autonat" map del 5060 udp --protocol "$protocol"
done

step "autonat map list: the router's whole table (empty again)"
lan "$autonat" map list

step "The daemon: a SIP profile with ext-sip-ip = auto-nat (it maps its SIP ports 5060 udp+tcp itself)"
mkdir -p "$AUTONAT_STATE_DIR"
cat > "$AUTONAT_STATE_DIR/autonat.toml" <<CONFIG
[[profile]]
name = "external"
ext-sip-ip = "auto-nat"
ext-rtp-ip = "auto-nat"
[control]
socket = "$AUTONAT_STATE_DIR/control.sock"
[journal]
path = "$AUTONAT_STATE_DIR/journal.sqlite"
CONFIG
# Not through the lan() function: a backgrounded function is a subshell, and $! would be its PID.
"$autonat" lab --prefix "$prefix" exec lan -- "$autonat" run --config "$AUTONAT_STATE_DIR/autonat.toml" \
    2> "$AUTONAT_STATE_DIR/daemon.log" &
daemon=$!
for _ in $(seq 50); do [ -S "$AUTONAT_STATE_DIR/control.sock" ] && break; sleep 0.1; done
sleep 0.5
"$autonat" nat_map status --socket "$AUTONAT_STATE_DIR/control.sock"
"$autonat" profile status external --socket "$AUTONAT_STATE_DIR/control.sock" | grep -E "Ext-SIP-IP|Ext-RTP-IP|^URL"

step "The test call: SIPp on the internet host dials the echo test 9196 at the router's public address"
for _ in $(seq 50); do
    "$autonat" calls --socket "$AUTONAT_STATE_DIR/control.sock" >/dev/null 2>&1 && break; sleep 0.1
done
sleep 1  # the RTP pool maps its first pairs
(cd "$AUTONAT_STATE_DIR" && wan sipp -sn uac -s 9196 203.0.113.1:5060 -i 203.0.113.100 -m 1 -nostdin \
    -timeout 20 -timeout_error -trace_msg >/dev/null 2>&1) || { echo "the test call FAILED"; exit 1; }
echo "call completed: INVITE, 200 OK, ACK, BYE through the NAT"
grep -m1 -A25 "SIP/2.0 200 OK" "$AUTONAT_STATE_DIR"/uac_*_messages.log | grep -E "^Contact|^c=|^m=audio" || true

step "The router's WAN address changes: the profile follows, nothing restarts"
"$autonat" lab --prefix "$prefix" fault set-wan-ip 203.0.113.2
sleep 1
"$autonat" profile status external --socket "$AUTONAT_STATE_DIR/control.sock" | grep -E "Ext-SIP-IP|Ext-RTP-IP"

step "SIGTERM: the daemon removes its mappings before it exits"
kill -TERM "$daemon"
wait "$daemon" || true
lan upnpc -u http://192.168.77.1:5000/rootDesc.xml -l | grep -E '^ *[0-9]+ (UDP|TCP)' || echo "(router table empty)"

step "done: router found, public address learnt, holes opened and closed with PCP, NAT-PMP and UPnP, a test call answered through the NAT, and a daemon's mappings and profile kept right through an address change"
