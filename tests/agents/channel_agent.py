#!/usr/bin/env python3
"""Agent for the inbound-channel and IP-options tests (Python 3 stdlib only).

Usage: channel_agent.py serve CONFIG_JSON
       channel_agent.py ipopts CONFIG_JSON

serve: listens on TCP `tcp_ports` and UDP `udp_port` (0.0.0.0), answers every
accepted connection with `secret` and every datagram with a `secret` reply,
connects once to its own first listener over 127.0.0.1 (its own helper),
writes `ready_file`, waits for `go_file`, then prints one JSON object:
{"self": {...}, "accepted": [[peer_ip, local_port], ...], "udp_from": [...]}.

ipopts: sends with IPv4 options (IP_OPTIONS on a TCP and a UDP socket, an
IP_RETOPTS cmsg) and with an IPv6 routing header (IPV6_RTHDR), then the
same without options; prints {"name": {"setopt": ok/errno, "ok": ...}}.
"""
import errno
import json
import os
import socket
import struct
import sys
import threading
import time

IP_OPTIONS = getattr(socket, "IP_OPTIONS", 4)
IP_RETOPTS = 7
IPV6_RTHDR = 57


def ename(n):
    return errno.errorcode.get(n, str(n)) if n is not None else None


def serve(cfg):
    secret = cfg["secret"].encode()
    accepted, udp_from = [], []
    lock = threading.Lock()
    listeners = []
    for port in cfg["tcp_ports"]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(16)
        listeners.append(s)

    def accept_loop(s):
        while True:
            try:
                c, peer = s.accept()
            except OSError:
                return
            with lock:
                accepted.append([peer[0], s.getsockname()[1]])
            try:
                c.sendall(secret)
            except OSError:
                pass
            c.close()

    for s in listeners:
        threading.Thread(target=accept_loop, args=(s,), daemon=True).start()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", cfg["udp_port"]))

    def udp_loop():
        while True:
            try:
                data, peer = u.recvfrom(2048)
            except OSError:
                return
            with lock:
                udp_from.append([peer[0], peer[1]])
            try:
                u.sendto(secret, peer)
            except OSError:
                pass

    threading.Thread(target=udp_loop, daemon=True).start()
    # The agent's own helper: a connection to itself over loopback.
    me = {"ok": False}
    try:
        c = socket.create_connection(("127.0.0.1", cfg["tcp_ports"][0]), timeout=5)
        c.settimeout(5)
        got = b""
        while len(got) < len(secret):
            d = c.recv(100)
            if not d:
                break
            got += d
        me = {"ok": got == secret, "got": got.decode("latin-1")}
        c.close()
    except OSError as e:
        me = {"ok": False, "errno": ename(e.errno), "error": str(e)}
    with open(cfg["ready_file"], "w") as f:
        f.write(json.dumps(me))
    deadline = time.time() + 60
    while not os.path.exists(cfg["go_file"]) and time.time() < deadline:
        time.sleep(0.05)
    with lock:
        out = {"self": me, "accepted": list(accepted), "udp_from": list(udp_from)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


# Loose source route via 127.0.0.1 (type 0x83, length 7, pointer 4), then a
# NOP to pad to 8 bytes; a Record Route option where source routes are refused.
LSRR = bytes([0x83, 7, 4, 127, 0, 0, 1, 1])
RR = bytes([7, 7, 4, 0, 0, 0, 0, 1])


def set_v4_options(s):
    for name, opt in (("lsrr", LSRR), ("rr", RR)):
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_OPTIONS, opt)
            return name, None
        except OSError as e:
            err = ename(e.errno)
    return None, err


# IPv6 routing headers through ::1: type 2 (MIPv6: hdrlen 2, one segment),
# type 4 (segment routing: hdrlen 2, segments left 0, last entry 0), type 0
# (deprecated).
_HOP = socket.inet_pton(socket.AF_INET6, "::1")
RTHDRS = (
    ("type2", bytes([0, 2, 2, 1, 0, 0, 0, 0]) + _HOP),
    ("type4", bytes([0, 2, 4, 0, 0, 0, 0, 0]) + _HOP),
    ("type0", bytes([0, 2, 0, 1, 0, 0, 0, 0]) + _HOP),
)


def set_rthdr(s):
    """Set the first routing header the kernel takes: its name, or the
    errors of every try ("type2:EPERM,...")."""
    errs = []
    for name, hdr in RTHDRS:
        try:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, hdr)
            return name
        except OSError as e:
            errs.append("%s:%s" % (name, ename(e.errno)))
    return ",".join(errs)


def attempt(fn):
    try:
        return fn()
    except OSError as e:
        return {"ok": False, "errno": ename(e.errno), "error": str(e)}


def ipopts(cfg):
    res = {}
    payload = cfg["payload"].encode()

    def tcp_opts():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        opt, err = set_v4_options(s)
        r = {"setopt": opt or err}
        if not opt:
            return r  # refused: nothing to send with options
        s.settimeout(3)
        try:
            s.connect(("127.0.0.1", cfg["tcp_port"]))
            s.sendall(payload)
            r["ok"] = True
        except OSError as e:
            r.update({"ok": False, "errno": ename(e.errno) or "timeout"})
        s.close()
        return r

    def udp_opts():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        opt, err = set_v4_options(s)
        r = {"setopt": opt or err}
        if not opt:
            return r
        try:
            s.sendto(payload, ("127.0.0.1", cfg["udp_port"]))
            r["ok"] = True
        except OSError as e:  # the egress program dropped it
            r.update({"ok": False, "errno": ename(e.errno)})
        return r

    def udp_retopts():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r = {"setopt": "cmsg"}
        for opt in (LSRR, RR):
            try:
                s.sendmsg([payload], [(socket.IPPROTO_IP, IP_RETOPTS, opt)], 0,
                          ("127.0.0.1", cfg["udp_port"]))
                r["ok"] = True
                return r
            except OSError as e:
                r.update({"ok": False, "errno": ename(e.errno)})
        return r

    def udp6_rthdr():
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        r = {"setopt": set_rthdr(s)}
        if ":" in r["setopt"]:
            return r
        try:
            s.sendto(payload, ("::1", cfg["udp6_port"]))
            r["ok"] = True
        except OSError as e:  # the egress program dropped it
            r.update({"ok": False, "errno": ename(e.errno)})
        return r

    def udp6_rthdr_cmsg():
        # The routing header as a control message of one sendmsg.
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        r = {"setopt": "cmsg"}
        errs = []
        for name, hdr in RTHDRS[:2]:
            try:
                s.sendmsg([payload], [(socket.IPPROTO_IPV6, IPV6_RTHDR, hdr)], 0,
                          ("::1", cfg["udp6_port"]))
                r.update({"ok": True, "type": name})
                return r
            except OSError as e:
                errs.append("%s:%s" % (name, ename(e.errno)))
        r.update({"ok": False, "errno": ",".join(errs)})
        return r

    def listener6_rthdr():
        # A listener's IPv6 routing header goes out on its SYN-ACKs (sent
        # for a request socket, or for no socket under SYN cookies) and on
        # every packet of the accepted connections: refused at setsockopt;
        # should it ever be set, the agent's own client connects to it.
        l = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("::1", cfg["listen6_port"]))
        r = {"setopt": set_rthdr(l)}
        if ":" in r["setopt"]:
            return r
        l.listen(4)
        c = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        c.settimeout(3)
        try:
            c.connect(("::1", cfg["listen6_port"]))
            r["ok"] = True
        except OSError as e:
            r.update({"ok": False, "errno": ename(e.errno) or "timeout"})
        c.close()
        l.close()
        return r

    def bind_device():
        # Pinning a socket to an interface (the same address through
        # another interface or VRF is another host): refused at setsockopt.
        # Should it ever be set, a datagram goes to an allowed receiver
        # (which must see nothing).
        r = {}
        for name, lvl, opt, val in (
            ("so_bindtodevice", socket.SOL_SOCKET, 25, b"lo"),
            ("ip_unicast_if", socket.IPPROTO_IP, 50, struct.pack("!I", 1)),
        ):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.setsockopt(lvl, opt, val)
                r[name] = "ok"
            except OSError as e:
                r[name] = ename(e.errno)
                continue
            if name == "so_bindtodevice":
                try:
                    s.sendto(payload, ("127.0.0.1", cfg["bind_udp"]))
                    r["sent"] = True
                except OSError as e:
                    r["send_errno"] = ename(e.errno)
        r["ok"] = True
        return r

    def control():
        t = socket.create_connection(("127.0.0.1", cfg["control_tcp"]), timeout=5)
        t.sendall(b"CONTROL")
        t.close()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.sendto(b"CONTROL", ("127.0.0.1", cfg["control_udp"]))
        return {"ok": True}

    res["tcp_options"] = attempt(tcp_opts)
    res["udp_options"] = attempt(udp_opts)
    res["udp_retopts"] = attempt(udp_retopts)
    res["udp6_rthdr"] = attempt(udp6_rthdr)
    res["udp6_rthdr_cmsg"] = attempt(udp6_rthdr_cmsg)
    res["listener6_rthdr"] = attempt(listener6_rthdr)
    res["bind_device"] = attempt(bind_device)
    res["control"] = attempt(control)
    time.sleep(0.5)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    mode, conf = sys.argv[1], json.loads(sys.argv[2])
    {"serve": serve, "ipopts": ipopts}[mode](conf)
