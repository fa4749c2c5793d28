#!/usr/bin/env python3
"""A deterministic keep-alive HTTP/1.1 client for benches/callgrind_pass.sh.

    pass_client.py <port> <requests> [connections] [path]

Opens `connections` keep-alive sockets and sends exactly `requests` GETs,
round-robin: one request on every socket, then every answer read, so the
proxy sees the same sequence of reads and writes each run (wrk can only run
for a time, not for a count). Exits non-zero on any answer that is not 200.
"""

import socket
import sys


def read_response(sock, buf):
    """Reads one response from `sock`; returns (status, leftover bytes)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the headers")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() == b"transfer-encoding":
            raise ValueError("chunked answers are not expected from the bench upstream")
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the body")
        rest += chunk
    return status, rest[length:]


def main():
    port = int(sys.argv[1])
    total = int(sys.argv[2])
    conns = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    path = sys.argv[4] if len(sys.argv) > 4 else "/"
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append([s, b""])
    sent = 0
    while sent < total:
        batch = socks[: min(conns, total - sent)]
        for entry in batch:
            entry[0].sendall(request)
        for entry in batch:
            status, entry[1] = read_response(entry[0], entry[1])
            if status != 200:
                sys.exit(f"answer {status} to request {sent}")
            sent += 1
    for s, _ in socks:
        s.close()


if __name__ == "__main__":
    main()
