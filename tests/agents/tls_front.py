#!/usr/bin/env python3
"""A TLS + HTTP "front" serving two names on one address (the tests'
stand-in for a CDN). It counts every byte any connection delivered and
logs the first bytes of each connection, then answers: TLS (certificate
for both names) or plain HTTP, "hello <name>".

Usage: tls_front.py HOST PORT CERT KEY LOG
LOG gets one JSON line per connection: {"n": i, "bytes": total, "head": hex}.
"""
import json
import socket
import ssl
import sys
import threading

host, port, cert, key, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
names = {}
ctx.sni_callback = lambda obj, name, c: names.__setitem__(id(obj), name)
lock = threading.Lock()
count = [0]


class Counting:
    """Count what arrives before handing the socket to ssl."""


def serve(conn, n):
    conn.settimeout(5)
    first = b""
    try:
        first = conn.recv(65536, socket.MSG_PEEK)
    except OSError:
        pass
    rec = {"n": n, "bytes": len(first), "head": first[:48].hex()}
    with lock:
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")
    if not first:
        conn.close()
        return
    try:
        if first[0] == 0x16:
            t = ctx.wrap_socket(conn, server_side=True)
            req = t.recv(65536)
            name = names.get(id(t), "-")
            body = ("hello %s" % name).encode()
            t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            t.close()
        else:
            req = conn.recv(65536)
            hostline = [l for l in req.split(b"\r\n") if l.lower().startswith(b"host:")]
            name = hostline[0][5:].strip().decode("latin-1") if hostline else "-"
            body = ("hello %s" % name).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            conn.close()
    except (OSError, ssl.SSLError):
        conn.close()


srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(64)
print(json.dumps({"ready": True}), flush=True)
n = 0
while True:
    c, _ = srv.accept()
    n += 1
    threading.Thread(target=serve, args=(c, n), daemon=True).start()
