#!/usr/bin/env python3
"""The hostile agent of the first-bytes tests (Python 3 stdlib, curl).

Speaks the probe protocol (see dns_agent.py): one JSON command per stdin
line, one JSON answer per stdout line. It resolves names through the
enforcer's DNS proxy, then reaches a TLS/HTTP "front" at the learned
address naming other hosts than the allowed one, the way an injected
prompt would.

Commands:
  {"op": "resolve", ...}                         as dns_agent.py
  {"op": "curl", "args": [...], "timeout": s}    run curl -> {"rc", "out", "err"}
  {"op": "tls", "host": ip, "port": p, "sni": name|null, "cafile": f,
   "request": text}   Python ssl: handshake, send, read the answer -> {"reply"}
  {"op": "raw", "host": ip, "port": p, "chunks": [hex...], "nodelay": bool,
   "pause": s, "fastopen": bool, "wait": s}
      connect (or sendto MSG_FASTOPEN), send the chunks with pauses, then
      read for `wait` seconds -> {"sent", "reply" (hex), "read_err"}
  {"op": "hello", "sni": name, "alpn": n}   a real ClientHello from Python's
      ssl (MemoryBIO, nothing sent) -> {"hex"}
  {"op": "udp", "host": ip, "port": p, "data": s}   sendto
"""
import json
import os
import socket
import ssl
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dns_agent  # noqa: E402

MSG_FASTOPEN = 0x20000000


def curl(cmd):
    p = subprocess.run(["curl", "-sS"] + cmd["args"], capture_output=True,
                       timeout=cmd.get("timeout", 20), check=False)
    return {"rc": p.returncode, "out": p.stdout.decode("latin-1"),
            "err": p.stderr.decode("latin-1")}


def tls(cmd):
    ctx = ssl.create_default_context(cafile=cmd.get("cafile"))
    if not cmd.get("verify", True):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    s = socket.create_connection((cmd["host"], cmd["port"]), timeout=cmd.get("timeout", 3))
    try:
        t = ctx.wrap_socket(s, server_hostname=cmd.get("sni"))
        t.sendall(cmd["request"].encode())
        reply = b""
        while True:
            d = t.recv(4096)
            if not d:
                break
            reply += d
        return {"reply": reply.decode("latin-1")}
    finally:
        s.close()


def raw(cmd):
    host, port = cmd["host"], cmd["port"]
    s = socket.socket(dns_agent.fam(host), socket.SOCK_STREAM)
    s.settimeout(cmd.get("timeout", 5))
    sent = 0
    try:
        if cmd.get("nodelay"):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        chunks = [bytes.fromhex(c) for c in cmd["chunks"]]
        if cmd.get("fastopen"):
            s.sendto(chunks[0], MSG_FASTOPEN, (host, port))
            sent += len(chunks[0])
            chunks = chunks[1:]
        else:
            s.connect((host, port))
        for c in chunks:
            s.sendall(c)
            sent += len(c)
            time.sleep(cmd.get("pause", 0))
        reply, read_err = b"", None
        s.settimeout(cmd.get("wait", 1))
        try:
            while True:
                d = s.recv(4096)
                if not d:
                    break
                reply += d
        except OSError as e:
            read_err = str(e)
        return {"sent": sent, "reply": reply.hex(), "read_err": read_err}
    finally:
        s.close()


def hello(cmd):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cmd.get("alpn"):
        ctx.set_alpn_protocols(["proto-%04d" % i for i in range(cmd["alpn"])])
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=cmd.get("sni"))
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return {"hex": out.read().hex()}


def udp(cmd):
    s = socket.socket(dns_agent.fam(cmd["host"]), socket.SOCK_DGRAM)
    try:
        s.sendto(cmd["data"].encode(), (cmd["host"], cmd["port"]))
        return {"sent": len(cmd["data"])}
    finally:
        s.close()


OPS = {"curl": curl, "tls": tls, "raw": raw, "hello": hello, "udp": udp,
       "resolve": dns_agent.resolve}


def run(cmd):
    rec = {"ok": False, "errno": None, "err": None}
    try:
        rec.update(OPS[cmd["op"]](cmd))
        rec["ok"] = True
    except OSError as e:
        rec["errno"] = e.errno
        rec["err"] = "%s: %s" % (type(e).__name__, e)
    except Exception as e:  # noqa: BLE001
        rec["err"] = "%s: %s" % (type(e).__name__, e)
    return rec


def main():
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            sys.exit(cmd.get("code", 0))
        print(json.dumps(run(cmd)), flush=True)


if __name__ == "__main__":
    main()
