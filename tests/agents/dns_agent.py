#!/usr/bin/env python3
"""DNS agent for the enforcer's DNS tests (Python 3 stdlib only).

It is the hostile side: it builds its DNS queries by hand and sends them to
whatever resolver address it is told (127.0.0.9:53, [::1]:53, ...) over UDP
or TCP, so the tests control the resolver without touching /etc/resolv.conf.

Usage: dns_agent.py            serve: print {"ready": true, "pid": N}, then
                               one JSON command per stdin line, one JSON
                               answer per stdout line
       dns_agent.py once JSON  run one command, print its answer

Commands:
  {"op": "resolve", "server": ip, "port": 53, "name": n, "qtype": "A",
   "tcp": false, "connected": false, "timeout": 5}
      -> {"rcode": int, "addrs": [...], "cnames": [...], "txt": [...],
          "ttls": [...], "src": "ip:port" (sender of the UDP reply / TCP
          peer), "peer": "ip:port" (getpeername, connected UDP and TCP),
          "qname": question name of the reply (letter case kept),
          "owners": [owner name of each answer record],
          "question_same": the reply's question section is byte for byte
          the query's}
      "flood": N (UDP, unconnected): between sending the query and reading
      the reply, N fresh sockets each send one byte to server:port and
      close -> also "flood_secs"
  {"op": "tcp", "host": h, "port": p, "data": s}   connect + send
  {"op": "loop", "server": ip, "port": 53, "names": [...], "iterations": N,
   "connect_port": p}
      resolve names[i % len] then connect to its first address, N times;
      -> {"iterations", "resolve_fail", "connect_fail", "errors": [...],
          "secs"}
  {"op": "child", "cmd": {...}}   run cmd in a child process (same tree)
  {"op": "read", "path": p}       open + read the first 64 bytes
  {"op": "exit"}
Answer: {"ok": bool, "errno": int|null, "err": str|null, ...}.
"""
import errno as E
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time

QTYPES = {"A": 1, "NS": 2, "CNAME": 5, "NULL": 10, "PTR": 12, "MX": 15,
          "TXT": 16, "AAAA": 28, "SRV": 33, "ANY": 255}


def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def fmt_addr(a):
    host, port = a[0], a[1]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def encode_query(qid, name, qtype):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD
    for label in name.rstrip(".").split("."):
        b = label.encode()
        q += bytes([len(b)]) + b
    return q + b"\0" + struct.pack("!HH", qtype, 1)


def read_name(msg, off):
    labels, jumped, end = [], False, off
    for _ in range(128):
        n = msg[off]
        if n == 0:
            off += 1
            break
        if n & 0xC0 == 0xC0:
            ptr = ((n & 0x3F) << 8) | msg[off + 1]
            if not jumped:
                end = off + 2
            jumped = True
            off = ptr
            continue
        labels.append(msg[off + 1:off + 1 + n].decode("ascii", "replace"))
        off += 1 + n
    return ".".join(labels), (end if jumped else off)


def parse_reply(msg, qid):
    rid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", msg[:12])
    out = {"rcode": flags & 0xF, "id_ok": rid == qid, "qr": bool(flags & 0x8000),
           "tc": bool(flags & 0x0200), "addrs": [], "cnames": [], "txt": [], "ttls": [],
           "qname": None, "owners": []}
    off = 12
    for _ in range(qd):
        qname, off = read_name(msg, off)
        if out["qname"] is None:
            out["qname"] = qname
        off += 4
    for _ in range(an):
        owner, off = read_name(msg, off)
        out["owners"].append(owner)
        rtype, _cls, ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
        off += 10
        rd = msg[off:off + rdlen]
        if rtype == 1 and rdlen == 4:
            out["addrs"].append(socket.inet_ntop(socket.AF_INET, rd))
            out["ttls"].append(ttl)
        elif rtype == 28 and rdlen == 16:
            out["addrs"].append(socket.inet_ntop(socket.AF_INET6, rd))
            out["ttls"].append(ttl)
        elif rtype == 5:
            out["cnames"].append(read_name(msg, off)[0])
        elif rtype == 16:
            i, txt = 0, []
            while i < len(rd):
                n = rd[i]
                txt.append(rd[i + 1:i + 1 + n].decode("utf-8", "replace"))
                i += 1 + n
            out["txt"].append("".join(txt))
        off += rdlen
    return out


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise ConnectionError("connection closed after %d of %d bytes" % (len(b), n))
        b += c
    return b


def resolve(cmd):
    server, port = cmd.get("server", "127.0.0.9"), cmd.get("port", 53)
    qtype = cmd.get("qtype", "A")
    qtype = QTYPES[qtype] if isinstance(qtype, str) else int(qtype)
    qid = random.randrange(1, 65536)
    q = encode_query(qid, cmd["name"], qtype)
    timeout = cmd.get("timeout", 5)
    extra = {}
    if cmd.get("tcp"):
        s = socket.socket(fam(server), socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect((server, port))
            extra["peer"] = fmt_addr(s.getpeername())
            s.sendall(struct.pack("!H", len(q)) + q)
            n = struct.unpack("!H", recv_exact(s, 2))[0]
            msg = recv_exact(s, n)
            extra["src"] = extra["peer"]
        finally:
            s.close()
    else:
        s = socket.socket(fam(server), socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            if cmd.get("connected"):
                s.connect((server, port))
                extra["peer"] = fmt_addr(s.getpeername())
                s.send(q)
            else:
                s.sendto(q, (server, port))
            flood = cmd.get("flood", 0)
            if flood:
                t0 = time.monotonic()
                for _ in range(flood):
                    f = socket.socket(fam(server), socket.SOCK_DGRAM)
                    try:
                        f.sendto(b"\0", (server, port))
                    finally:
                        f.close()
                extra["flood_secs"] = time.monotonic() - t0
            msg, src = s.recvfrom(65535)
            extra["src"] = fmt_addr(src)
        finally:
            s.close()
    out = parse_reply(msg, qid)
    # The query has one question and nothing after it.
    out["question_same"] = msg[4:6] == q[4:6] and msg[12:len(q)] == q[12:]
    out.update(extra)
    return out


def tcp_send(cmd):
    s = socket.socket(fam(cmd["host"]), socket.SOCK_STREAM)
    s.settimeout(cmd.get("timeout", 5))
    try:
        s.connect((cmd["host"], cmd["port"]))
        data = cmd.get("data", "").encode()
        s.sendall(data)
        return {"sent": len(data)}
    finally:
        s.close()


def connect_close(host, port):
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    s.settimeout(5)
    # RST on close: no TIME_WAIT, the ephemeral ports never run out
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        s.connect((host, port))
    finally:
        s.close()


def loop(cmd):
    names, n, port = cmd["names"], cmd["iterations"], cmd["connect_port"]
    rfail = cfail = 0
    errors = []
    t0 = time.monotonic()
    for i in range(n):
        name = names[i % len(names)]
        try:
            r = resolve({"server": cmd.get("server", "127.0.0.9"), "port": cmd.get("port", 53),
                         "name": name, "qtype": "A", "tcp": cmd.get("tcp", False)})
            if r["rcode"] != 0 or not r["addrs"]:
                raise ValueError("rcode %d addrs %r" % (r["rcode"], r["addrs"]))
        except Exception as e:  # noqa: BLE001
            rfail += 1
            if len(errors) < 10:
                errors.append("resolve %d %s: %s" % (i, name, e))
            continue
        addr = r["addrs"][i % len(r["addrs"])]
        try:
            connect_close(addr, port)
        except OSError as e:
            cfail += 1
            if len(errors) < 10:
                errors.append("connect %d %s -> %s: %s" % (i, name, addr, E.errorcode.get(e.errno, e)))
    return {"iterations": n, "resolve_fail": rfail, "connect_fail": cfail,
            "errors": errors, "secs": time.monotonic() - t0}


def child(cmd):
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "once", json.dumps(cmd["cmd"])],
                       capture_output=True, timeout=60, check=False)
    rec = json.loads(p.stdout.decode().strip().splitlines()[-1])
    return {"child": rec}


def do(cmd):
    op = cmd["op"]
    if op == "resolve":
        return resolve(cmd)
    if op == "tcp":
        return tcp_send(cmd)
    if op == "loop":
        return loop(cmd)
    if op == "child":
        return child(cmd)
    if op == "read":
        with open(cmd["path"], "rb") as f:
            return {"data": f.read(64).decode("latin-1")}
    if op == "exit":
        sys.exit(cmd.get("code", 0))
    raise ValueError("unknown op %r" % op)


def run(cmd):
    rec = {"ok": False, "errno": None, "err": None, "pid": os.getpid()}
    try:
        rec.update(do(cmd))
        rec["ok"] = True
    except OSError as e:
        rec["errno"] = e.errno
        rec["err"] = "%s: %s" % (E.errorcode.get(e.errno, "?") if e.errno else type(e).__name__, e)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001
        rec["err"] = "%s: %s" % (type(e).__name__, e)
    return rec


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "once":
        print(json.dumps(run(json.loads(sys.argv[2]))), flush=True)
        return
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
