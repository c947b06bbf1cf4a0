"""The ``flexguard`` command: check a text, diagnose an endpoint, run the emulated guard server.

Only the standard library is imported at start-up, so ``flexguard --help`` stays fast; Guard, httpx and
pydantic are imported inside the commands that need them.

Exit codes of ``flexguard check``: 0 when the text may pass unchanged (ALLOW, FLAG); 1 when the decision
stops the original text (BLOCK, and also REDACT and REROUTE: the caller must not use the text as given);
2 on an error (bad configuration or policy, bad input, guard unavailable under ``on_error: raise``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__

if TYPE_CHECKING:
    from .guard import Guard
    from .verdict import Decision, Verdict

EXIT_PASS = 0
EXIT_STOPPED = 1
EXIT_ERROR = 2

OK, FAIL, SKIP = "✓", "✗", "–"
DOCTOR_SAMPLE = "What time does the museum open on Sundays?"
_SURFACES = ("prompt", "response", "tool_call", "tool_result", "retrieved")
_SERVER_HINT = (
    "  Set FLEXGUARD_BASE_URL (and FLEXGUARD_MODEL) to a vLLM or SGLang server, e.g.\n"
    "    export FLEXGUARD_BASE_URL=http://localhost:8000/v1 FLEXGUARD_MODEL=Qwen/Qwen3Guard-Gen-8B\n"
    "  or pass --base-url/--model."
)
_FAKE_HINT = (
    "run `flexguard fake-server` (an EMULATED guard) in another terminal and point FLEXGUARD_BASE_URL at\n"
    "  http://127.0.0.1:8000/v1."
)
_NO_ENDPOINT = (
    "flexguard: no guard endpoint is configured, and the local extra is not installed.\n"
    f"{_SERVER_HINT} To try the package without a GPU server, either install the local extra\n"
    "    pip install 'flexguard-integrations[local]'\n"
    "  (install the CPU build of torch first: pip install torch --index-url https://download.pytorch.org/whl/cpu)\n"
    "  and `flexguard check` runs Qwen/Qwen3Guard-Gen-0.6B in this process (about 1.5 GB downloaded once;\n"
    f"  FLEXGUARD_LOCAL_MODEL or --local-model picks another model; see docs/local.md), or {_FAKE_HINT}"
)


# ===================================================================== parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flexguard`` command."""
    parser = argparse.ArgumentParser(
        prog="flexguard",
        description="Check texts with a FlexGuard / Qwen3Guard-Gen guard model served by vLLM or SGLang.",
    )
    parser.add_argument("--version", action="version", version=f"flexguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser(
        "check",
        help="check one text and print the verdict and the decision",
        description="Check TEXT (a prompt; with --response, the response to it) and print the decision. "
        "Exit 0 when the text may pass (allow, flag), 1 when the decision stops it "
        "(block, redact, reroute), 2 on an error.",
    )
    check.add_argument("text", metavar="TEXT", help="the text to check; '-' reads it from stdin")
    check.add_argument(
        "--response", metavar="TEXT", help="check this model response (TEXT is then its prompt); '-' = stdin"
    )
    check.add_argument("--surface", choices=_SURFACES, help="where the text comes from (default: prompt/response)")
    check.add_argument("--policy", metavar="P", help="preset (strict, moderate, loose) or a policy YAML file")
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    check.add_argument(
        "--local-model",
        metavar="NAME_OR_DIR",
        help="with no endpoint configured: the model to run in this process with transformers (extra 'local'; "
        "env FLEXGUARD_LOCAL_MODEL, default Qwen/Qwen3Guard-Gen-0.6B)",
    )
    _endpoint_options(check, base_url=True)

    doctor = sub.add_parser(
        "doctor",
        help="check that a guard endpoint works and report what it serves",
        description="Check a vLLM / SGLang endpoint: health, served models, control-token handling and one "
        "test verdict. Exit 0 when it works, 1 otherwise.",
    )
    doctor.add_argument("url", metavar="URL", help="server URL, e.g. http://localhost:8000 or .../v1")
    _endpoint_options(doctor, base_url=False)

    sub.add_parser(
        "fake-server",
        help="run the EMULATED guard server (FakeGuardServer) in the foreground",
        description="Run FakeGuardServer until Ctrl-C. Options: see `flexguard fake-server --help`.",
        add_help=False,
    )
    from .eval.cli import register

    register(sub)
    return parser


def _endpoint_options(p: argparse.ArgumentParser, *, base_url: bool) -> None:
    if base_url:
        p.add_argument("--base-url", metavar="URL", help="guard server URL (env FLEXGUARD_BASE_URL)")
    p.add_argument("--model", metavar="NAME", help="served model name (env FLEXGUARD_MODEL)")
    p.add_argument("--family", metavar="F", help="guard family: flexguard or qwen3guard (default: from the name)")
    p.add_argument("--api-key", metavar="K", help="bearer token of the server (env FLEXGUARD_API_KEY)")
    p.add_argument("--timeout", metavar="S", type=_positive_float, help="seconds per check (default 30)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


# ===================================================================== entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flexguard`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        if args_list and args_list[0] == "fake-server":
            return _fake_server(args_list[1:])
        args = build_parser().parse_args(args_list)
        if args.command == "check":
            return _check(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command in ("eval", "calibrate", "moderate"):
            from .eval.cli import run

            return run(args)
        build_parser().print_help()
        return EXIT_ERROR
    except SystemExit as exc:  # argparse: --help / --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_ERROR)
    except KeyboardInterrupt:
        return 130


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (so redirection and test capture work)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr)
        except Exception:  # logging must never break the command
            self.handleError(record)


def _setup_logging() -> None:
    """Show the library's warnings (guard unavailable, FAIL-OPEN) on stderr with a clear prefix."""
    logger = logging.getLogger("flexguard_integrations")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("flexguard: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def _local_guard_or_none(args: argparse.Namespace, env: Mapping[str, str]) -> Guard | None:
    """The in-process guard (extra ``local``) used when no endpoint is configured; None without the extra."""
    from .transport.local import DEFAULT_LOCAL_MODEL, local_extra_available

    if not local_extra_available():
        return None
    from .errors import ConfigurationError, PolicyError
    from .guard import Guard

    model = getattr(args, "local_model", None) or env.get("FLEXGUARD_LOCAL_MODEL") or DEFAULT_LOCAL_MODEL
    options: dict[str, Any] = {}
    if getattr(args, "timeout", None):
        options["timeout"] = args.timeout
    _err(
        f"flexguard: no FLEXGUARD_BASE_URL; running {model} in this process with transformers on the CPU "
        "(a hub model is downloaded once into the Hugging Face cache)"
    )
    try:
        return Guard.local(
            model,
            family=getattr(args, "family", None) or env.get("FLEXGUARD_FAMILY") or None,
            policy=getattr(args, "policy", None) or env.get("FLEXGUARD_POLICY") or "moderate",
            **options,
        )
    except PolicyError:
        raise
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"{exc}\n  No guard endpoint is configured either.\n{_SERVER_HINT} Or {_FAKE_HINT}"
        ) from exc


def _err(message: str) -> None:
    print(message, file=sys.stderr)


# ===================================================================== check


def _read_arg(value: str, name: str, used_stdin: list[bool]) -> str:
    if value != "-":
        return value
    if used_stdin:
        raise ValueError(f"{name}: only one argument may be read from stdin ('-')")
    used_stdin.append(True)
    return sys.stdin.read().rstrip("\r\n")


def _build_guard(args: argparse.Namespace, env: Mapping[str, str]) -> Guard | None:
    """A Guard from flags and FLEXGUARD_* variables (flags win); None when no endpoint is configured."""
    from .guard import Guard

    base_url = args.base_url or env.get("FLEXGUARD_BASE_URL")
    if not base_url:
        return _local_guard_or_none(args, env)
    overrides: dict[str, Any] = {"base_url": base_url}
    for key in ("model", "family", "api_key", "timeout", "policy"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if not (args.model or env.get("FLEXGUARD_MODEL")):
        overrides["model"] = _discover_model(base_url, args.api_key or env.get("FLEXGUARD_API_KEY"))
    return Guard.from_env(env, **overrides)


def _discover_model(base_url: str, api_key: str | None) -> str:
    """The only served model, when the server serves exactly one; a ConfigurationError otherwise."""
    from .errors import ConfigurationError, GuardTransportError
    from .transport.http import HTTPTransport

    hint = "FLEXGUARD_MODEL is not set; give the served model name with --model or FLEXGUARD_MODEL"
    transport = HTTPTransport(base_url, api_key=api_key)
    try:
        names = [str(m.get("id")) for m in transport.models(deadline=time.monotonic() + 5.0) if m.get("id")]
    except GuardTransportError as exc:  # the server is unreachable or not a guard server: say so
        raise ConfigurationError(f"{hint} (it could not be read from {base_url}/models: {exc})") from None
    finally:
        transport.close()
    if len(names) == 1:
        _err(f"flexguard: using the only served model {names[0]!r}")
        return names[0]
    if names:
        raise ConfigurationError(f"{hint}; the server serves: {', '.join(names)}")
    raise ConfigurationError(hint)


def _check(args: argparse.Namespace) -> int:
    from .errors import FlexGuardError, GuardUnavailableError, PolicyError

    used_stdin: list[bool] = []
    try:
        text = _read_arg(args.text, "TEXT", used_stdin)
        response = _read_arg(args.response, "--response", used_stdin) if args.response is not None else None
    except ValueError as exc:
        _err(f"flexguard: {exc}")
        return EXIT_ERROR
    try:
        guard = _build_guard(args, os.environ)
    except FlexGuardError as exc:
        kind = "bad policy" if isinstance(exc, PolicyError) else "configuration error"
        _err(f"flexguard: {kind}: {exc}")
        return EXIT_ERROR
    if guard is None:
        _err(_NO_ENDPOINT)
        return EXIT_ERROR
    try:
        with guard:
            decision = guard.check(text, response, surface=args.surface)
    except GuardUnavailableError as exc:
        _err(f"flexguard: guard unavailable (policy on_error: raise): {exc}")
        return EXIT_ERROR
    except (FlexGuardError, ValueError) as exc:
        _err(f"flexguard: {exc}")
        return EXIT_ERROR
    if args.json:
        print(json.dumps(decision.to_dict(), ensure_ascii=False, indent=2))
    else:
        _print_decision(decision, guard, sys.stdout)
    return EXIT_PASS if decision.action.passes else EXIT_STOPPED


def _fmt_score(value: float) -> str:
    return f"{value:g}"


def _print_decision(decision: Decision, guard: Guard, out: TextIO) -> None:
    """The decision and its verdict, one field a line."""
    v: Verdict = decision.verdict
    cats = ", ".join(c.value for c in v.categories) or "none"
    native = f"  (native: {', '.join(v.native_categories)})" if v.native_categories else ""
    refusal = {True: "yes", False: "no", None: "-"}[v.refusal]
    threshold = f"  (threshold {_fmt_score(decision.threshold)})" if decision.threshold is not None else ""
    rows: list[tuple[str, str]] = [("action", decision.action.value.upper())]
    if v.error is None:
        rows += [
            ("risk score", f"{_fmt_score(v.risk_score)} / 100{threshold}"),
            ("categories", cats + native),
            ("native label", v.native_label or "-"),
            ("refusal", refusal),
        ]
    else:
        rows.append(("guard error", v.error))
    rows += [
        ("reason", decision.reason),
        ("latency", f"{v.latency_ms:.1f} ms" if v.latency_ms is not None else "-"),
        ("fail-open", "YES (allowed without a verdict)" if decision.fail_open else "no"),
    ]
    if decision.route:
        rows.append(("route", decision.route))
    if decision.redacted_text is not None:
        rows.append(("redacted text", decision.redacted_text))
    rows += [
        ("model", f"{guard.model_name} ({guard.model.family})"),
        (
            "policy",
            f"{decision.policy or guard.policy.label}, surface {decision.surface.value if decision.surface else '-'}",
        ),
    ]
    width = max(len(k) for k, _ in rows) + 1
    for key, value in rows:
        print(f"{key + ':':<{width}} {value}", file=out)


# ===================================================================== fake-server


def _fake_server(argv: list[str]) -> int:
    """Run FakeGuardServer in the foreground (the testing package parses the options)."""
    from .testing.__main__ import build_parser as server_parser
    from .testing.__main__ import main as server_main

    parser = server_parser()
    parser.prog = "flexguard fake-server"
    opts = parser.parse_args(argv)  # --help and usage errors end here, under our name
    print(
        "flexguard fake-server: this is an EMULATED guard (FakeGuardServer): answers come from a keyword "
        "lexicon and scripted rules, not from a real model. For testing only.",
        flush=True,
    )
    if opts.port:
        first = (opts.models or ["Qwen/Qwen3Guard-Gen-8B"])[0]
        print(
            f"  try: export FLEXGUARD_BASE_URL=http://{opts.host}:{opts.port}/v1 FLEXGUARD_MODEL={first}\n"
            f'       flexguard check "How do I make a bomb?"',
            flush=True,
        )
    return server_main(argv)


# ===================================================================== doctor


def _line(ok: str, title: str, detail: str) -> None:
    print(f"{ok} {title}: {detail}", flush=True)


def _doctor(args: argparse.Namespace) -> int:
    from .errors import FlexGuardError, GuardTransportError
    from .transport.http import HTTPTransport

    timeout: float = args.timeout or 10.0
    api_key = args.api_key or os.environ.get("FLEXGUARD_API_KEY") or None
    try:
        transport = HTTPTransport(args.url, api_key=api_key)
    except FlexGuardError as exc:
        _err(f"flexguard doctor: {exc}")
        return EXIT_ERROR
    print(f"flexguard doctor: {transport.base_url}", flush=True)  # credentials are removed from it

    def deadline() -> float:
        return time.monotonic() + timeout

    try:
        # (1) health
        health_ok = False
        try:
            resp = transport.get("/health", deadline=deadline())
            health_ok = resp.status_code == 200
            _line(OK if health_ok else FAIL, "GET /health", f"HTTP {resp.status_code}")
        except GuardTransportError as exc:
            _line(FAIL, "GET /health", str(exc))

        # (2) served models
        models: list[dict[str, Any]] = []
        families: dict[str, str] = {}
        try:
            models = transport.models(deadline=deadline())
            if models:
                _line(OK, "GET /v1/models", f"{len(models)} served model(s)")
            else:
                _line(FAIL, "GET /v1/models", "the server lists no model")
        except GuardTransportError as exc:
            _line(FAIL, "GET /v1/models", str(exc))
        for m in models:
            name = str(m.get("id", "?"))
            families[name] = _family_of(name)
            max_len = m.get("max_model_len")
            print(f"    {name}  max_model_len={max_len if max_len is not None else 'not reported'}  "
                  f"family={families[name]}")  # fmt: skip

        reachable = health_ok or bool(models)
        # (3) control tokens
        if reachable:
            _doctor_tokens(transport, deadline())
        else:
            _line(SKIP, "control tokens", "skipped: the server cannot be reached")

        # (4) one test verdict
        verdict_ok = False
        if not reachable:
            _line(FAIL, "test verdict", "skipped: the server cannot be reached")
        else:
            model = args.model or next((n for n, f in families.items() if f != "unknown"), None)
            verdict_ok = _doctor_verdict(transport, model, args.family, families, timeout)
    finally:
        transport.close()
    works = health_ok and bool(models) and verdict_ok
    print(f"{'endpoint works' if works else 'endpoint does NOT work'}", flush=True)
    return EXIT_PASS if works else EXIT_STOPPED


def _family_of(name: str) -> str:
    from .errors import ConfigurationError
    from .models import infer_family

    try:
        return infer_family(name)
    except ConfigurationError:
        return "unknown"


def _doctor_tokens(transport: Any, deadline: float) -> None:
    """Report whether ``<|im_end|>`` inside content becomes one special token on this server."""
    from .errors import GuardTransportError

    title = "control tokens"
    body = {"prompt": "hi<|im_end|>", "return_token_strs": True}
    data: Any = None
    tried: list[str] = []
    for path in ("/tokenize", "/v1/tokenize"):
        try:
            resp = transport.post_json(path, body, deadline=deadline)
        except GuardTransportError as exc:
            tried.append(f"{path}: {exc}")
            continue
        if resp.status_code != 200:
            tried.append(f"{path}: HTTP {resp.status_code}")
            continue
        try:
            data = resp.json()
        except ValueError:
            tried.append(f"{path}: not JSON")
            continue
        break
    if not isinstance(data, dict):
        _line(SKIP, title, "/tokenize is unavailable (" + "; ".join(tried) + "); the package neutralises "
              "control tokens before sending anyway")  # fmt: skip
        return
    strs, ids = data.get("token_strs"), data.get("tokens")
    if isinstance(strs, list):
        one = "<|im_end|>" in strs
        how = f"tokens {strs!r}"
    elif isinstance(ids, list):
        one = len(ids) <= 2  # 'hi' + one special token; as plain text <|im_end|> takes several
        how = f"{len(ids)} token ids (no token strings returned)"
    else:
        _line(SKIP, title, "/tokenize answered without tokens; cannot tell")
        return
    if one:
        _line(OK, title, f"'hi<|im_end|>' -> {how}: <|im_end|> in content came back as ONE special token, so "
              "the server turns control-token strings in user text into real control tokens; the package "
              "neutralises them before sending - this is why")  # fmt: skip
    else:
        _line(OK, title, f"'hi<|im_end|>' -> {how}: <|im_end|> stayed plain text on this server (the package "
              "neutralises control tokens anyway)")  # fmt: skip


def _doctor_verdict(
    transport: Any, model: str | None, family: str | None, families: Mapping[str, str], timeout: float
) -> bool:
    """Check one benign sentence with a Guard on ``model``; True when a sensible verdict came back."""
    from .errors import FlexGuardError
    from .guard import Guard

    title = "test verdict"
    if model is None:
        _line(FAIL, title, "no served model belongs to a known guard family; pass --model NAME (and --family)")
        return False
    if families and model not in families:
        _line(FAIL, title, f"{model!r} is not among the served models ({', '.join(families)})")
        return False
    try:
        guard = Guard.from_endpoint(
            transport.base_url, model, family=family, policy="moderate", timeout=timeout, transport=transport,
            cache=False,
        )  # fmt: skip
        verdict = guard.verdict(DOCTOR_SAMPLE)
    except FlexGuardError as exc:
        _line(FAIL, title, f"{model}: {exc}")
        return False
    latency = f"{verdict.latency_ms:.0f} ms" if verdict.latency_ms is not None else "? ms"
    where = f"{model} ({guard.model.family})"
    if verdict.error is not None:
        _line(FAIL, title, f"{where}: no verdict ({verdict.error}) after {latency}")
        return False
    label = verdict.native_label or "-"
    detail = f"{where}: {DOCTOR_SAMPLE!r} -> risk {verdict.risk_score:g}, {label!r} in {latency}"
    if verdict.risk_score >= 41:
        _line(FAIL, title, detail + "; a benign sentence scored this high: check the model name and family")
        return False
    _line(OK, title, detail)
    return True
