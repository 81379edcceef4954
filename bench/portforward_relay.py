"""A plain Twisted TCP relay: the baseline for what Twisted costs per byte.

It is :class:`twisted.protocols.portforward.ProxyFactory` as shipped, on the
epoll reactor (the one ``twistd`` picks on Linux): it parses nothing, routes
nothing and forwards each chunk with ``transport.write``. A proxy built on
Twisted cannot be cheaper per relayed byte without bypassing that write path,
so the ratio against this relay shows how much the proxy adds on top of
Twisted itself.

Usage (by ``bench/run.py``)::

    python bench/portforward_relay.py --fd 5 --target 127.0.0.1:8081

``--fd`` is an inherited listening socket.
"""

from __future__ import annotations

import argparse
import os
import socket

from twisted.internet import epollreactor

epollreactor.install()  # type: ignore[no-untyped-call]

from twisted.internet import reactor  # noqa: E402
from twisted.internet.interfaces import IReactorCore, IReactorSocket  # noqa: E402
from twisted.protocols.portforward import ProxyFactory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    # The reactor accepts until EAGAIN, so an inherited blocking socket would
    # stall it in accept().
    os.set_blocking(args.fd, False)
    factory = ProxyFactory(host, int(port))
    # ProxyFactory is a plain Factory, which is all adoptStreamPort needs,
    # though its annotation asks for a ServerFactory.
    IReactorSocket(reactor).adoptStreamPort(args.fd, socket.AF_INET, factory)  # type: ignore[arg-type]
    IReactorCore(reactor).run()


if __name__ == "__main__":
    main()
