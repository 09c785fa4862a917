"""Real SIP software from Debian in the lab's namespaces: baresip 1.0 as a phone, kamailio 5.6 as a registrar.

Baresip runs headless: its tone source is an 8 kHz WAV of ours (`aufile`), `-t` ends the run (and the call, with
BYE), and commands reach it mid-call through its `ctrl_tcp` module (netstring JSON on 127.0.0.1 inside the
namespace, sent by a Python one-liner run there). `rtp_ports` pins its RTP port, so a capture can count it.
Account parameters select what the issue lists: `medianat=ice` (module ice), `rtcp_mux yes` in the config,
`answermode=auto` for a phone that is called. Measured with baresip 1.0: with ICE offered and no ICE in the
answer it sends no RTP at all; hold is a re-INVITE with `a=sendonly`, resume one with `a=sendrecv`.

Kamailio runs in the foreground (`-DD -E`) with a config of ours (registrar, digest against fixed credentials,
location in memory, record-routing proxy) and a ctl socket for `kamcmd ul.dump`. Every process is ended by its
PID, SIGTERM first.
"""

from __future__ import annotations

import json
import math
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autonat.lab import Lab

BARESIP = "/usr/bin/baresip"
KAMAILIO = "/usr/sbin/kamailio"
KAMCMD = "/usr/sbin/kamcmd"
MODULES = ("g711", "aufile", "ice", "srtp", "stun")

_CONTROL = """
import json, socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
data = json.dumps({"command": sys.argv[2], "params": sys.argv[3], "token": "t"}).encode()
sock.sendall(str(len(data)).encode() + b":" + data + b",")
print(sock.recv(4096).decode("utf-8", "replace"))
"""


def require(*programs: str) -> None:
    """Fail (never skip) when a Debian package the test needs is missing."""
    missing = [program for program in programs if not Path(program).exists()]
    assert not missing, f"missing {', '.join(missing)}: run ./scripts/install.sh as root (baresip-core, kamailio)"


def tone(path: Path, seconds: float = 30.0, frequency: float = 440.0) -> None:
    """An 8 kHz mono 16-bit sine WAV: what the phone says (baresip's aufile source plays it)."""
    rate = 8000
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        samples = (int(8000 * math.sin(2 * math.pi * frequency * i / rate)) for i in range(int(rate * seconds)))
        out.writeframes(b"".join(struct.pack("<h", sample) for sample in samples))


@dataclass
class Baresip:
    """One baresip on `host` at `address`:`sip_port`, RTP on `rtp_port` (and the next one), controlled on
    `ctrl_port`. `account` is its accounts line."""

    lab: Lab
    directory: Path
    address: str
    account: str
    sip_port: int = 5090
    rtp_port: int = 7000
    ctrl_port: int = 4444
    rtcp_mux: bool = False
    host: str = "wan"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def _configure(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        sound = self.directory / "tone.wav"
        if not sound.exists():
            tone(sound)
        lines = [
            "poll_method epoll",
            f"sip_listen {self.address}:{self.sip_port}",
            "call_local_timeout 120",
            "audio_player aufile,/dev/null",
            f"audio_source aufile,{sound}",
            "audio_alert aufile,/dev/null",
            "ausrc_srate 8000",
            "ausrc_channels 1",
            f"rtp_ports {self.rtp_port}-{self.rtp_port + 1}",
            f"rtcp_mux {'yes' if self.rtcp_mux else 'no'}",
            "module_path /usr/lib/baresip/modules",
            *(f"module {name}.so" for name in MODULES),
            "module_app account.so",
            "module_app menu.so",
            "module_app ctrl_tcp.so",
            f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}",
        ]
        (self.directory / "config").write_text("\n".join(lines) + "\n")
        (self.directory / "accounts").write_text(self.account + "\n")

    def start(self, *commands: str, seconds: float) -> Baresip:
        """Run for `seconds` (then it hangs up and exits), executing `commands` at start (e.g. a /dial)."""
        self._configure()
        argv = [BARESIP, "-f", str(self.directory), "-t", str(math.ceil(seconds))]
        for command in commands:
            argv += ["-e", command]
        with (self.directory / "baresip.log").open("wb") as log:
            self.process = self.lab.popen(self.host, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self

    def command(self, name: str, params: str = "") -> dict[str, Any]:
        """A ctrl_tcp command (hold, resume, hangup, ...); its reply."""
        result = self.lab.run(
            self.host, [sys.executable, "-c", _CONTROL, str(self.ctrl_port), name, params], timeout=10
        )
        reply = result.stdout.strip()
        assert result.returncode == 0 and reply, f"baresip {name}: {result.stderr.strip()}"
        length, _, rest = reply.partition(":")  # a netstring: "<length>:<json>," (events may follow)
        payload = json.loads(rest[: int(length)])
        assert isinstance(payload, dict) and payload.get("ok"), f"baresip {name}: {reply}"
        return payload

    def wait(self, timeout: float) -> str:
        """Wait for the run to end (`-t`); its log."""
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
            finally:
                self.stop()
        return self.log()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def log(self) -> str:
        path = self.directory / "baresip.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""


KAMAILIO_CFG = """#!KAMAILIO
# A registrar and record-routing proxy for the autonat lab: digest against fixed credentials, location in memory.
debug=2
log_stderror=yes
children=2
listen=udp:{address}:{port}
auto_aliases=no

mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
loadmodule "ctl.so"
loadmodule "kex.so"

modparam("usrloc", "db_mode", 0)
modparam("ctl", "binrpc", "unix:{control}")

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (has_totag()) {{
        # In a dialog: by the Route we recorded, else to the Request-URI.
        loose_route();
        t_relay();
        exit;
    }}
    if (is_method("REGISTER")) {{
        if (!pv_auth_check("$fd", "{password}", "0", "1")) {{ auth_challenge("$fd", "0"); exit; }}
        if (!save("location")) {{ sl_reply_error(); }}
        exit;
    }}
    if (is_method("INVITE")) {{ record_route(); }}
    if (!lookup("location")) {{ sl_send_reply("404", "Not Found"); exit; }}
    t_relay();
}}
"""


@dataclass
class Kamailio:
    """kamailio on `host` at `address`:`port`, accepting REGISTERs with `password` (any user)."""

    lab: Lab
    directory: Path
    address: str
    port: int = 5080
    password: str = "pw200"  # noqa: S105 (a test credential)
    host: str = "wan"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # A Unix socket path must stay under 108 bytes: pytest's tmp_path can be longer.
    control: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kam")) / "ctl.sock")

    def start(self, timeout: float = 10.0) -> Kamailio:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "kamailio.cfg"
        config.write_text(
            KAMAILIO_CFG.format(address=self.address, port=self.port, control=self.control, password=self.password)
        )
        argv = [KAMAILIO, "-f", str(config), "-DD", "-E", "-P", str(self.directory / "kamailio.pid")]
        with (self.directory / "kamailio.log").open("wb") as log:
            self.process = self.lab.popen(self.host, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self.control.exists():
            assert self.process.poll() is None, f"kamailio exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"kamailio did not come up:\n{self.log()}"
            time.sleep(0.05)
        return self

    def contacts(self) -> list[str]:
        """The Contact URIs in its location table (`kamcmd ul.dump`)."""
        result = self.lab.run(self.host, [KAMCMD, "-s", f"unix:{self.control}", "ul.dump"], timeout=10)
        assert result.returncode == 0, result.stderr
        return re.findall(r"Address: (\S+)", result.stdout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None
        self.control.unlink(missing_ok=True)
        self.control.parent.rmdir()

    def log(self) -> str:
        path = self.directory / "kamailio.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""
