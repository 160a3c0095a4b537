"""The HTTP server's connection limits as command-line options (``serve`` and ``mesh serve``)."""
from __future__ import annotations

import argparse

from ..errors import MoemeshError
from ..server.common.limits import ConnectionLimits

_DEFAULT = ConnectionLimits()


def add_limit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP limits (slow or hostile clients)")
    g.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                   help="largest request body; bigger gets HTTP 413 before it is read (default: 64 bytes per "
                   "context token, at least 4 MiB)")
    g.add_argument("--header-timeout", type=float, default=_DEFAULT.header_timeout, metavar="S",
                   help=f"seconds a client may take to send its request headers (default {_DEFAULT.header_timeout:g})")
    g.add_argument("--body-timeout", type=float, default=_DEFAULT.body_timeout, metavar="S",
                   help=f"seconds a client may take to send its request body (default {_DEFAULT.body_timeout:g})")
    g.add_argument("--max-connections", type=int, default=_DEFAULT.max_connections, metavar="N",
                   help=f"open connections at most; more get HTTP 503 (default {_DEFAULT.max_connections})")


def connection_limits(args: argparse.Namespace) -> ConnectionLimits:
    for name, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout),
                        ("--max-connections", args.max_connections), ("--max-body-bytes", args.max_body_bytes)):
        if value is not None and not value > 0:
            raise MoemeshError(f"{name} must be > 0, got {value}")
    return ConnectionLimits(max_body_bytes=args.max_body_bytes, header_timeout=args.header_timeout,
                            body_timeout=args.body_timeout, max_connections=args.max_connections)
