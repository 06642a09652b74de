#!/usr/bin/env python3
"""`cargo xtask bench-tls` helpers (Python 3 stdlib).

server HOST PORT_A PORT_B CERT KEY
    TLS on both ports: read one request head, answer "ok", close.
worker --names A,B --ports PA,PB --cafile F --conns N --rounds R
    (under `enforcer run`) resolve both names through the system resolver
    (steered to the enforcer's DNS proxy), then, in interleaved rounds
    (A B, B A, ...), N sequential TLS handshakes + one request each to
    name A on port A and name B on port B. Prints one JSON line, then waits
    3 s so that the bench can read the kernel's program statistics while
    the programs are attached.
"""
import json
import socket
import ssl
import sys
import threading
import time


def serve(host, port, ctx):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(512)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c, ctx), daemon=True).start()


def handle(c, ctx):
    try:
        c.settimeout(5)
        t = ctx.wrap_socket(c, server_side=True)
        req = b""
        while b"\r\n\r\n" not in req:
            d = t.recv(4096)
            if not d:
                break
            req += d
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        t.close()
    except (OSError, ssl.SSLError):
        c.close()


def server(argv):
    host, pa, pb, cert, key = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    for p in (pa, pb):
        threading.Thread(target=serve, args=(host, p, ctx), daemon=True).start()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        time.sleep(3600)


def fetch(ctx, ip, port, name):
    s = socket.create_connection((ip, port), timeout=5)
    t = ctx.wrap_socket(s, server_hostname=name)
    t.sendall(("GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name).encode())
    got = b""
    while True:
        d = t.recv(4096)
        if not d:
            break
        got += d
    t.close()
    if not got.endswith(b"ok"):
        raise RuntimeError("bad answer %r" % got[:80])


def worker(argv):
    args = dict(zip(argv[::2], argv[1::2]))
    names = args["--names"].split(",")
    ports = [int(p) for p in args["--ports"].split(",")]
    n, rounds = int(args["--conns"]), int(args["--rounds"])
    ctx = ssl.create_default_context(cafile=args["--cafile"])
    ips = [socket.getaddrinfo(nm, p, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
           for nm, p in zip(names, ports)]
    for i in range(2):  # warm up both paths
        for k in range(20):
            fetch(ctx, ips[i], ports[i], names[i])
    rates = [[], []]
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            t0 = time.perf_counter()
            for _ in range(n):
                fetch(ctx, ips[i], ports[i], names[i])
            rates[i].append(n / (time.perf_counter() - t0))
    ratios = sorted(a / b for a, b in zip(rates[0], rates[1]))
    print(json.dumps({"ips": ips, "rates_a": rates[0], "rates_b": rates[1],
                      "ratios": ratios, "median": ratios[len(ratios) // 2]}), flush=True)
    time.sleep(3)


if __name__ == "__main__":
    {"server": server, "worker": worker}[sys.argv[1]](sys.argv[2:])
