"""`kochat-trl ui`: a local web page over a run folder (report and curves, answers side by side, chat, data)."""

from __future__ import annotations

import argparse
import os

from kochat_trl.ui.limits import DEFAULT_QUEUE_SIZE

INSTALL_HINT = "pip install 'kochat-trl[ui]'"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "ui",
        help="look at a run in the browser: report and curves, every model's answers side by side, chat, data",
        description="Serve a Gradio page over RUN (a `kochat-trl pipeline` output folder) with four tabs: Run "
        "(report.json numbers, stage curves, wall times, judge table), Compare (one prompt, every model's answer "
        "with its reward-model score and judge flags; API /compare), Chat (multi-turn with one model) and Data (the "
        "first rows of each stage's data with the drop counts). Binds to 127.0.0.1 and shares nothing unless asked; "
        "every request is bounded (prompt 2,000 characters, 512 new tokens, 8 allow-listed generate options, "
        "--queue-size waiting requests). "
        f"Needs the ui extra: {INSTALL_HINT}.",
    )
    parser.add_argument("--run", required=True, metavar="DIR", help="a pipeline run folder (e.g. runs/tiny)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument(
        "--share", action="store_true", help="also create a public gradio.live link (off by default; needs internet)"
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=DEFAULT_QUEUE_SIZE,
        metavar="N",
        help=f"requests that may wait for their turn (default {DEFAULT_QUEUE_SIZE}); one more is refused with "
        "'Queue is full'",
    )
    parser.set_defaults(handler=run)


def _check_address(host: str, port: int) -> None:
    import errno
    import socket

    from kochat_trl.errors import KochatError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port is free
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise KochatError(f"cannot serve on {host}:{port} (the port is in use); pass a free --port") from None
            raise KochatError(f"cannot serve on {host}:{port} ({error.strerror or error}); check --host") from None


def exposure_warning(host: str, share: bool) -> str | None:
    """The warning for a page that other machines can reach (a non-loopback --host, or --share), else None."""
    import ipaddress

    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        local = False
    if local and not share:
        return None
    where = "a public gradio.live link" if share else f"--host {host}"
    return (
        f"ui: {where} serves this page beyond this machine: anyone who can reach it can use the models and read "
        "the run folder's files (each request is bounded, not authenticated)"
    )


def run(args: argparse.Namespace) -> int:
    from kochat_trl.errors import KochatError
    from kochat_trl.ui.run_folder import open_run

    open_run(args.run)  # a wrong folder, a missing gradio or a busy port fail in a second, before torch loads
    if not 0 < args.port < 65536:
        raise KochatError(f"--port must be in 1..65535, got {args.port}")
    if not 1 <= args.queue_size <= 1000:
        raise KochatError(f"--queue-size must be in 1..1000, got {args.queue_size}")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise KochatError(f"the ui needs gradio: {INSTALL_HINT}") from None
    _check_address(args.host, args.port)
    from transformers.utils import logging as hf_logging

    from kochat_trl.run.console import note
    from kochat_trl.ui.app import serve

    hf_logging.disable_progress_bar()  # "Loading weights" bars on the server console at each first answer
    warning = exposure_warning(args.host, args.share)
    if warning:
        note(warning)
    serve(args.run, args.host, args.port, args.share, queue_size=args.queue_size)
    return 0
