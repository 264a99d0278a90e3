#!/usr/bin/env python3
"""record_replies.py -- record raw kernel replies for the crate's decoder tests.

Independent of the Rust code: requests are built here with the same encoder
as shared/reference/netdev_probe.py (stdlib only), sent over a raw
AF_NETLINK socket, and every request and reply is printed as a Rust byte
literal.  The request bytes double as golden samples for the Rust encoder
(fixed sequence numbers below); the replies were pasted into
src/sys/recorded.rs.

Run as root on the machine whose kernel you want to record:
    python3 transport-devmem/tools/record_replies.py > /tmp/replies.txt
"""

import ctypes
import os
import socket
import struct
import sys
import time

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x01, 0x04, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
GENL_ID_CTRL = 0x10


def nla(atype, payload):
    return struct.pack("=HH", 4 + len(payload), atype) + payload + \
        b"\0" * ((-len(payload)) % 4)


def u16(v):
    return struct.pack("=H", v)


def u32(v):
    return struct.pack("=I", v)


def msg(family, flags, seq, cmd, version, attrs):
    body = struct.pack("=BBH", cmd, version, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), family, NLM_F_REQUEST | flags,
                       seq, 0) + body


def rust(name, data):
    out = ["pub const %s: &[u8] = &[" % name]
    for i in range(0, len(data), 16):
        out.append("    " + " ".join("0x%02x," % b for b in data[i:i + 16]))
    out.append("];")
    return "\n".join(out)


class Sock:
    def __init__(self):
        self.s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                               NETLINK_GENERIC)
        for opt in (11, 10, 12):   # EXT_ACK, CAP_ACK, GET_STRICT_CHK
            self.s.setsockopt(SOL_NETLINK, opt, 1)
        self.s.bind((0, 0))
        self.s.settimeout(5.0)

    def xfer(self, req, dump):
        """Send req, return the list of raw datagrams up to DONE/ERROR."""
        self.s.send(req)
        seq = struct.unpack_from("=I", req, 8)[0]
        grams = []
        while True:
            data = self.s.recv(1 << 20)
            grams.append(data)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _fl, s, _p = struct.unpack_from("=IHHII", data, off)
                off += (ln + 3) & ~3
                if s != seq:
                    continue
                if typ in (NLMSG_ERROR, NLMSG_DONE):
                    return grams
                if not dump and not (struct.unpack_from("=H", req, 6)[0]
                                     & NLM_F_ACK):
                    return grams


def family_id(sk, name):
    req = msg(GENL_ID_CTRL, NLM_F_ACK, 1, 3, 2, nla(2, name + b"\0"))
    data = sk.xfer(req, False)[0]
    off = 20
    while off < len(data):
        ln, at = struct.unpack_from("=HH", data, off)
        if at == 1:
            return struct.unpack_from("=H", data, off + 4)[0]
        off += (ln + 3) & ~3
    raise SystemExit("no family " + name.decode())


def record(sk, name, req, dump=False):
    grams = sk.xfer(req, dump)
    print("// request")
    print(rust("REQ_" + name, req))
    for i, g in enumerate(grams):
        print(rust("REPLY_%s_%d" % (name, i), g))
    print()


def q(qid, qtype, nested=True):
    return nla(2 | (NLA_F_NESTED if nested else 0),
               nla(1, u32(qid)) + nla(3, u32(qtype)))


def main():
    sk = Sock()
    print("// kernel:", os.uname().release)
    record(sk, "GETFAMILY_NETDEV",
           msg(GENL_ID_CTRL, NLM_F_ACK, 1, 3, 2, nla(2, b"netdev\0")))
    fam = family_id(sk, b"netdev")
    print("// netdev family id", fam)
    record(sk, "GETPOLICY_BIND_RX",
           msg(GENL_ID_CTRL, NLM_F_DUMP, 2, 10, 2,
               nla(1, u16(fam)) + nla(10, u32(13))), dump=True)
    record(sk, "DEV_GET_DUMP", msg(fam, NLM_F_DUMP, 3, 1, 1, b""), dump=True)
    record(sk, "QUEUE_GET_DUMP", msg(fam, NLM_F_DUMP, 4, 10, 1, b""),
           dump=True)
    record(sk, "NAPI_GET_DUMP", msg(fam, NLM_F_DUMP, 5, 11, 1, b""),
           dump=True)
    memfd = os.memfd_create("not-a-dmabuf")
    print("// memfd number", memfd)
    lo, eth0 = socket.if_nametoindex("lo"), socket.if_nametoindex("eth0")
    print("// ifindex lo", lo, "eth0", eth0)
    record(sk, "BIND_RX_LO",
           msg(fam, NLM_F_ACK, 6, 13, 1,
               nla(1, u32(lo)) + nla(3, u32(memfd)) + q(0, 0)))
    record(sk, "BIND_TX_ETH0",
           msg(fam, NLM_F_ACK, 7, 15, 1,
               nla(1, u32(eth0)) + nla(3, u32(memfd))))
    record(sk, "BIND_RX_IFINDEX0",
           msg(fam, NLM_F_ACK, 8, 13, 1,
               nla(1, u32(0)) + nla(3, u32(memfd)) + q(0, 0)))
    record(sk, "BIND_RX_NO_FD",
           msg(fam, NLM_F_ACK, 9, 13, 1, nla(1, u32(eth0)) + q(0, 0)))
    record(sk, "BIND_RX_NOT_NESTED",
           msg(fam, NLM_F_ACK, 10, 13, 1,
               nla(1, u32(eth0)) + nla(3, u32(memfd)) + q(0, 0, False)))
    record(sk, "BIND_RX_QTYPE7",
           msg(fam, NLM_F_ACK, 11, 13, 1,
               nla(1, u32(eth0)) + nla(3, u32(memfd)) + q(0, 7)))
    record(sk, "BIND_RX_NODEV",
           msg(fam, NLM_F_ACK, 12, 13, 1,
               nla(1, u32(99999)) + nla(3, u32(memfd)) + q(0, 0)))
    record(sk, "GETFAMILY_ETHTOOL",
           msg(GENL_ID_CTRL, NLM_F_ACK, 13, 3, 2, nla(2, b"ethtool\0")))
    eth = family_id(sk, b"ethtool")
    print("// ethtool family id", eth)
    # ETHTOOL_MSG_RINGS_GET=15, header nest (1) { DEV_INDEX (1) }
    record(sk, "RINGS_GET_ETH0",
           msg(eth, NLM_F_ACK, 14, 15, 1,
               nla(1 | NLA_F_NESTED, nla(1, u32(eth0)))))
    record(sk, "RINGS_GET_LO",
           msg(eth, NLM_F_ACK, 15, 15, 1,
               nla(1 | NLA_F_NESTED, nla(1, u32(lo)))))
    sk.s.close()

    # unprivileged bind-rx -> EPERM
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        s2 = Sock()
        mf = os.memfd_create("x")
        req = msg(fam, NLM_F_ACK, 16, 13, 1,
                  nla(1, u32(lo)) + nla(3, u32(mf)) + q(0, 0))
        g = s2.xfer(req, False)
        os.write(w, (rust("REQ_BIND_RX_UNPRIV", req) + "\n" +
                     rust("REPLY_BIND_RX_UNPRIV_0", g[0]) + "\n").encode())
        os._exit(0)
    os.close(w)
    out = b""
    while True:
        c = os.read(r, 65536)
        if not c:
            break
        out += c
    os.waitpid(pid, 0)
    print(out.decode())

    zerocopy_errqueue()


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(Iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


def zerocopy_errqueue():
    """Three MSG_ZEROCOPY sends on loopback TCP (v4 and v6), raw control
    buffer of the first MSG_ERRQUEUE read."""
    libc = ctypes.CDLL(None, use_errno=True)
    for fam, addr in ((socket.AF_INET, "127.0.0.1"),
                      (socket.AF_INET6, "::1")):
        lsn = socket.socket(fam, socket.SOCK_STREAM)
        lsn.bind((addr, 0))
        lsn.listen(1)
        cli = socket.create_connection(lsn.getsockname()[:2], timeout=5)
        srv, _ = lsn.accept()
        cli.setsockopt(socket.SOL_SOCKET, 60, 1)           # SO_ZEROCOPY
        for _ in range(3):
            cli.sendmsg([b"z" * 1000], [], 0x4000000)      # MSG_ZEROCOPY
        srv.recv(65536)
        time.sleep(0.2)
        ctl = ctypes.create_string_buffer(256)
        iov = Iovec(None, 0)
        mh = Msghdr(None, 0, ctypes.pointer(iov), 1,
                    ctypes.cast(ctl, ctypes.c_void_p), 256, 0)
        n = libc.recvmsg(cli.fileno(), ctypes.byref(mh), 0x2000 | 0x40)
        if n < 0:
            print("// errqueue recvmsg failed errno", ctypes.get_errno())
            continue
        tag = "V4" if fam == socket.AF_INET else "V6"
        print("// errqueue msg_flags 0x%x controllen %d" % (mh.flags,
                                                          mh.controllen))
        print(rust("ERRQUEUE_ZEROCOPY_" + tag, ctl.raw[:mh.controllen]))
        for s in (cli, srv, lsn):
            s.close()


if __name__ == "__main__":
    sys.exit(main())
