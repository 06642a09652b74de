#!/usr/bin/env python3
"""Probe process for daemon tests (Python 3 stdlib only).

Prints {"ready": true, "pid": N} and then serves one JSON command per stdin
line, answering one JSON line on stdout, so that the test can place it in a
cgroup *before* it does anything and then probe repeatedly:

  {"op": "tcp", "host": h, "port": p, "data": s}   connect + send
  {"op": "udp", "host": h, "port": p, "data": s}   unconnected sendto
  {"op": "udp_many", "host": h, "port": p, "count": n}
                     n sendto()s of one byte on one socket, as fast as it can;
                     returns how many were sent and how many failed with EPERM
  {"op": "socket", "family": f, "type": t}   socket(f, t, 0), closed at once
  {"op": "raw"}      socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)
  {"op": "raw6"}     socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)
  {"op": "ping"}     socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)
  {"op": "packet"}   socket(AF_PACKET, SOCK_RAW, ETH_P_ALL)
  {"op": "packet_udp", "host": h, "port": p, "data": s}
                     AF_PACKET on "lo": hand-built Ethernet/IPv4/UDP frame
                     from 127.0.0.1 to h:p (bypasses connect/sendmsg hooks)
  {"op": "unix", "path": p, "data": s}   AF_UNIX stream connect + send
                     ("\u0000name": an abstract socket)
  {"op": "read", "path": p}   open + read the first 64 bytes
  {"op": "cgroup"}   the 0:: line of /proc/self/cgroup
  {"op": "exit"}
Answer: {"ok": bool, "errno": int|null, "err": str|null, ...}.
"""
import errno as E
import json
import os
import socket
import struct
import sys


def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def packet_udp(host, port, data):
    """Inject an Ethernet frame on "lo" through AF_PACKET. IPv4 loopback
    sources are martians on input, so IPv4 targets get an IPv6 frame only
    when the host is "::1"; anything else is sent as IPv4 (best effort)."""
    if ":" in host:
        src, dst = socket.inet_pton(socket.AF_INET6, "::1"), socket.inet_pton(socket.AF_INET6, host)
        length = 8 + len(data)
        pseudo = src + dst + struct.pack("!IxxxB", length, 17)
        udp = struct.pack("!HHHH", 40000, port, length, 0) + data
        c = csum(pseudo + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", c) + udp[8:]
        ip = struct.pack("!IHBB", 6 << 28, length, 17, 64) + src + dst
        frame = b"\0" * 12 + struct.pack("!H", 0x86DD) + ip + udp
        proto = 0x86DD
    else:
        udp = struct.pack("!HHHH", 40000, port, 8 + len(data), 0) + data
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0, 64, 17, 0,
                         socket.inet_aton("127.0.0.1"), socket.inet_aton(host))
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        frame = b"\0" * 12 + struct.pack("!H", 0x0800) + ip + udp
        proto = 0x0800
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    try:
        s.bind(("lo", 0))
        return s.send(frame)
    finally:
        s.close()


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
    if op == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(cmd["path"])
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
    if op == "udp_many":
        s = socket.socket(fam(cmd["host"]), socket.SOCK_DGRAM)
        sent = eperm = 0
        try:
            for _ in range(cmd["count"]):
                try:
                    s.sendto(b"x", (cmd["host"], cmd["port"]))
                    sent += 1
                except PermissionError:
                    eperm += 1
        finally:
            s.close()
        return {"sent": sent, "eperm": eperm}
    if op == "socket":
        socket.socket(cmd["family"], cmd["type"], 0).close()
        return {}
    if op in ("raw", "raw6", "ping", "packet"):
        args = {
            "raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
            "raw6": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
            "ping": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
            "packet": (socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)),
        }[op]
        socket.socket(*args).close()
        return {}
    if op == "packet_udp":
        return {"sent": packet_udp(cmd["host"], cmd["port"], cmd["data"].encode())}
    if op == "read":
        with open(cmd["path"], "rb") as f:
            return {"data": f.read(64).decode("latin-1")}
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
