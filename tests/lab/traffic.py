"""Run inside a lab namespace: listen for, or send, one test payload (UDP datagram or TCP connection).

python traffic.py listen udp|tcp PORT SECONDS   -> prints the payload received, exit 1 on timeout
python traffic.py send udp|tcp HOST PORT PAYLOAD
"""

from __future__ import annotations

import socket
import sys


def listen(transport: str, port: int, seconds: float) -> int:
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.settimeout(seconds)
        print("ready", flush=True)
        try:
            if transport == "udp":
                data, _ = sock.recvfrom(2048)
            else:
                sock.listen(1)
                connection, _ = sock.accept()
                with connection:
                    connection.settimeout(seconds)
                    data = connection.recv(2048)
        except TimeoutError:
            return 1
        print(data.decode(errors="replace"), flush=True)
        return 0


def send(transport: str, host: str, port: int, payload: str) -> int:
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.settimeout(2)
        try:
            if transport == "udp":
                for _ in range(3):  # a few copies: the test asks "does it get through", not "is it lossless"
                    sock.sendto(payload.encode(), (host, port))
            else:
                sock.connect((host, port))
                sock.sendall(payload.encode())
        except OSError as exc:
            print(f"send failed: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    command, transport = sys.argv[1], sys.argv[2]
    if command == "listen":
        sys.exit(listen(transport, int(sys.argv[3]), float(sys.argv[4])))
    sys.exit(send(transport, sys.argv[3], int(sys.argv[4]), sys.argv[5]))
