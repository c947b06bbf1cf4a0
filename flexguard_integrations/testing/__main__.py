"""``python -m flexguard_integrations.testing``: run FakeGuardServer in the foreground until Ctrl-C.

``main(argv)`` is also what a ``flexguard fake-server`` command calls; ``run_forever(server)`` serves an
already-configured :class:`FakeGuardServer` until interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from .faults import FAULT_ORDER, FaultPlan, Latency
from .server import DEFAULT_MODELS, FakeGuardServer

__all__ = ["build_parser", "main", "parse_latency", "run_forever"]


def parse_latency(text: str) -> Latency:
    """``"0.05"`` → fixed seconds; ``"uniform:A:B"``, ``"lognormal:MU:SIGMA"``, ``"fixed:S"`` → a latency tuple."""
    parts = text.split(":")
    if len(parts) == 1:
        return float(parts[0])
    kind, *args = parts
    return (kind, *(float(a) for a in args))


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of the fake server."""
    p = argparse.ArgumentParser(
        prog="python -m flexguard_integrations.testing",
        description="Run a fake vLLM/SGLang guard server (FlexGuard and Qwen3Guard-Gen formats) until Ctrl-C.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (0 = any free port; default 8000)")
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help=f"served model name (repeatable; default: {', '.join(DEFAULT_MODELS)})",
    )
    p.add_argument("--error-style", choices=("vllm", "sglang"), default="vllm")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-model-len", type=int, default=32768)
    p.add_argument("--reasoning-parser", action="store_true", help="FlexGuard think text in reasoning_content")
    p.add_argument("--flexguard-style", choices=("bare", "labelled"), default="bare")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault / latency draws")
    p.add_argument("--tokenizer", default="auto", help="'auto', 'regex' or a tokenizer.json path")
    for field_name, fault in FAULT_ORDER:
        p.add_argument(
            "--" + field_name.replace("_", "-"),
            type=float,
            default=0.0,
            metavar="P",
            help=f"probability of the {fault} fault",
        )
    p.add_argument("--retry-after", type=float, default=None, help="Retry-After seconds on 503s")
    p.add_argument("--hang-seconds", type=float, default=None, help="answer hung requests after this long")
    p.add_argument(
        "--latency",
        type=parse_latency,
        default=None,
        help="seconds before each answer: 0.05, uniform:A:B, lognormal:MU:SIGMA",
    )
    return p


def run_forever(server: FakeGuardServer, *, stop_event: threading.Event | None = None, announce: bool = True) -> None:
    """Serve ``server`` until Ctrl-C / SIGTERM (or ``stop_event`` is set), then stop it cleanly."""
    try:
        import uvloop  # optional, only for the standalone server

        server._loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    stop = stop_event or threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():

        def _on_term(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = signal.signal(signal.SIGTERM, _on_term)
    server.start()
    try:
        if announce:
            print(f"FakeGuardServer listening on {server.base_url}  (models: {', '.join(server.models)})", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the server until interrupted; returns the exit code."""
    args = build_parser().parse_args(list(argv) if argv is not None else sys.argv[1:])
    try:
        plan = FaultPlan(
            retry_after=args.retry_after,
            hang_seconds=args.hang_seconds,
            latency=args.latency,
            **{name: getattr(args, name) for name, _ in FAULT_ORDER},
        )
        server = FakeGuardServer(
            tuple(args.models) if args.models else DEFAULT_MODELS,
            host=args.host,
            port=args.port,
            error_style=args.error_style,
            api_key=args.api_key,
            max_model_len=args.max_model_len,
            reasoning_parser=args.reasoning_parser,
            flexguard_style=args.flexguard_style,
            faults=plan,
            seed=args.seed,
            tokenizer=args.tokenizer,
        )
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run_forever(server)
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
