#!/usr/bin/env python3
"""Probe process for daemon tests (Python 3 stdlib only).

Prints {"ready": true, "pid": N} and then serves one JSON command per stdin
line, answering one JSON line on stdout, so that the test can place it in a
cgroup *before* it does anything and then probe repeatedly:

  {"op": "tcp", "host": h, "port": p, "data": s}   connect + send
  {"op": "udp", "host": h, "port": p, "data": s}   unconnected sendto
  {"op": "raw"}      socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)
  {"op": "raw6"}     socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)
  {"op": "ping"}     socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)
  {"op": "packet"}   socket(AF_PACKET, SOCK_RAW, ETH_P_ALL)
  {"op": "cgroup"}   the 0:: line of /proc/self/cgroup
  {"op": "exit"}
Answer: {"ok": bool, "errno": int|null, "err": str|null, ...}.
"""
import errno as E
import json
import os
import socket
import sys


def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def do(cmd):
    op = cmd["op"]
    if op == "tcp":
        s = socket.socket(fam(cmd["host"]), socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((cmd["host"], cmd["port"]))
            s.sendall(cmd["data"].encode())
            return {"sent": len(cmd["data"])}
        finally:
            s.close()
    if op == "udp":
        s = socket.socket(fam(cmd["host"]), socket.SOCK_DGRAM)
        try:
            return {"sent": s.sendto(cmd["data"].encode(), (cmd["host"], cmd["port"]))}
        finally:
            s.close()
    if op in ("raw", "raw6", "ping", "packet"):
        args = {
            "raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
            "raw6": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
            "ping": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
            "packet": (socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)),
        }[op]
        socket.socket(*args).close()
        return {}
    if op == "cgroup":
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return {"cgroup": line[3:].strip()}
        return {"cgroup": None}
    if op == "exit":
        sys.exit(0)
    raise ValueError("unknown op %r" % op)


def main():
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        rec = {"ok": False, "errno": None, "err": None}
        try:
            rec.update(do(cmd))
            rec["ok"] = True
        except OSError as e:
            rec["errno"] = e.errno
            rec["err"] = "%s: %s" % (E.errorcode.get(e.errno, "?"), e.strerror)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001
            rec["err"] = "%s: %s" % (type(e).__name__, e)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
