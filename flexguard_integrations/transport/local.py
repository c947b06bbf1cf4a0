"""An in-process transport: the guard model runs here with transformers (extra ``local``), no server needed.

It answers the same OpenAI-shaped chat completions as a vLLM / SGLang server, so the guard families parse
its answers exactly as they parse a server's. The model's own chat template renders ``messages`` (for
Qwen3Guard-Gen it holds the whole safety policy), decoding is greedy, and only the new tokens are decoded.

Inference never runs on the caller's thread or event loop: every request, sync or async, goes to one
worker thread that owns the model. The worker is a micro-batcher: it takes the first waiting request,
collects whatever else arrives within ``batch_window`` seconds (up to ``max_batch_size``), and runs them
as ONE left-padded batch through ``generate``. Concurrent checks (``Guard.abatch``, ``Guard.batch``,
redaction's sentences, the chunks of a long text) therefore share forward passes.

torch and transformers are imported only when a LocalTransport is built, never by ``import
flexguard_integrations``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any

from ..errors import (
    ConfigurationError,
    ContextLengthExceededError,
    FlexGuardError,
    GuardBadRequestError,
    GuardServerError,
    GuardTimeoutError,
)
from .base import remaining

logger = logging.getLogger("flexguard_integrations")

DEFAULT_LOCAL_MODEL = "Qwen/Qwen3Guard-Gen-0.6B"
INSTALL_HINT = (
    "the local guard needs the 'local' extra (transformers and torch): "
    "pip install 'flexguard-integrations[local]'. Install the CPU build of torch first "
    "(pip install torch --index-url https://download.pytorch.org/whl/cpu), otherwise pip may pull the "
    "multi-GB CUDA build"
)


def local_extra_available() -> bool:
    """True when torch and transformers can be imported (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def require_local_extra() -> None:
    """Raise a ConfigurationError naming the extra when torch or transformers is missing."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigurationError(f"{' and '.join(missing)} not installed; {INSTALL_HINT}")


@dataclass(frozen=True, slots=True)
class LocalStats:
    """Counters of one LocalTransport: requests answered, ``generate`` calls, the largest batch."""

    requests: int
    batches: int
    largest_batch: int

    @property
    def mean_batch(self) -> float:
        """Requests per ``generate`` call."""
        return self.requests / self.batches if self.batches else 0.0


@dataclass(slots=True)
class _Job:
    body: Mapping[str, Any]
    deadline: float
    future: Future[dict[str, Any]]


@dataclass(slots=True)
class _Encoded:
    job: _Job
    ids: list[int]
    max_new_tokens: int
    top_logprobs: int  # 0: no logprobs wanted


class LocalTransport:
    """Run a causal-LM guard model in this process with transformers; implements the Transport protocol.

    ``model`` is a hub name (downloaded once into the Hugging Face cache) or a local directory holding
    ``config.json``, the weights and the tokenizer files with a chat template. ``device`` is a torch device
    (``"cpu"`` by default); ``torch_dtype`` is passed to ``from_pretrained`` (``"auto"``: the checkpoint's
    own dtype). ``max_batch_size`` and ``batch_window`` (seconds) shape the micro-batches.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_LOCAL_MODEL,
        *,
        device: str = "cpu",
        torch_dtype: Any = "auto",
        max_batch_size: int = 8,
        batch_window: float = 0.005,
        revision: str | None = None,
        trust_remote_code: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigurationError(f"max_batch_size must be at least 1, got {max_batch_size!r}")
        if batch_window < 0:
            raise ConfigurationError(f"batch_window must not be negative, got {batch_window!r}")
        require_local_extra()
        self.name = os.fspath(model)
        self.device = device
        self.max_batch_size = int(max_batch_size)
        self.batch_window = float(batch_window)
        self._torch: Any = importlib.import_module("torch")
        transformers: Any = importlib.import_module("transformers")
        self._tokenizer, self._model = self._load(transformers, torch_dtype, revision, trust_remote_code, model_kwargs)
        config = self._model.config
        max_len = getattr(config, "max_position_embeddings", None)
        self.max_model_len: int | None = max_len if isinstance(max_len, int) and max_len > 0 else None
        self._pad_id, self._eos_ids = self._special_ids(transformers)
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._requests = 0
        self._batches = 0
        self._largest = 0

    # ------------------------------------------------------------------ loading

    def _load(
        self,
        transformers: Any,
        torch_dtype: Any,
        revision: str | None,
        trust_remote_code: bool,
        model_kwargs: Mapping[str, Any] | None,
    ) -> tuple[Any, Any]:
        common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        # transformers 4.56 renamed from_pretrained's torch_dtype to dtype; 5.x warns on the old name
        dtype_key = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
        kwargs: dict[str, Any] = {**common, dtype_key: torch_dtype, **(model_kwargs or {})}
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.name, **common)
            model = transformers.AutoModelForCausalLM.from_pretrained(self.name, **kwargs)
        except (OSError, ValueError, ImportError) as exc:
            raise ConfigurationError(
                f"cannot load the local guard model {self.name!r}: {_first_line(exc)}. Give a hub name (downloaded "
                "once into the Hugging Face cache, which needs network access; with HF_HUB_OFFLINE=1 only what "
                "is already cached loads) or a local directory with config.json, the weights and the tokenizer"
            ) from exc
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigurationError(
                f"the tokenizer of {self.name!r} has no chat template; the local guard renders requests with the "
                "model's own chat template (for Qwen3Guard-Gen it holds the safety policy)"
            )
        try:
            model.to(self.device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ConfigurationError(f"cannot move the guard model to device {self.device!r}: {exc}") from exc
        model.eval()
        return tokenizer, model

    def _special_ids(self, transformers: Any) -> tuple[int, frozenset[int]]:
        """(pad id, end-of-generation ids); generation is pure greedy with these and nothing else."""
        eos: set[int] = set()
        gen_eos = getattr(getattr(self._model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self._tokenizer.eos_token_id):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list | tuple):
                eos.update(v for v in value if isinstance(v, int))
        pad = self._tokenizer.pad_token_id
        if not isinstance(pad, int):
            pad = min(eos) if eos else 0
        # Our own generation config: greedy decoding like a server at temperature 0, without the checkpoint's
        # sampling defaults (which would only produce warnings, or change the answer)
        self._model.generation_config = transformers.GenerationConfig(
            do_sample=False,
            num_beams=1,
            eos_token_id=sorted(eos) or None,
            pad_token_id=pad,
        )
        return pad, frozenset(eos)

    def __repr__(self) -> str:
        return f"LocalTransport({self.name!r}, device={self.device!r}, max_batch_size={self.max_batch_size})"

    @property
    def stats(self) -> LocalStats:
        """Requests answered, ``generate`` calls (forward batches) and the largest batch so far."""
        return LocalStats(self._requests, self._batches, self._largest)

    # ------------------------------------------------------------------ Transport protocol

    async def acomplete(
        self, body: Mapping[str, Any], *, deadline: float, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Queue the request for the worker thread and wait for its batch, without blocking the loop."""
        future = self._submit(body, deadline)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(remaining(deadline), 0.0))
        except TimeoutError:
            future.cancel()
            raise GuardTimeoutError("the local guard model did not answer before the deadline") from None

    def complete(
        self, body: Mapping[str, Any], *, deadline: float, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Blocking twin of :meth:`acomplete`: the same queue and worker, so sync callers are batched too."""
        future = self._submit(body, deadline)
        try:
            return future.result(timeout=max(remaining(deadline), 0.0))
        except FutureTimeoutError:
            future.cancel()
            raise GuardTimeoutError("the local guard model did not answer before the deadline") from None

    async def amodels(self, *, deadline: float) -> list[dict[str, Any]]:
        return self.models(deadline=deadline)

    def models(self, *, deadline: float) -> list[dict[str, Any]]:
        """One entry, like ``GET /v1/models``: the model name and its context length."""
        entry: dict[str, Any] = {"id": self.name, "object": "model", "owned_by": "local"}
        if self.max_model_len is not None:
            entry["max_model_len"] = self.max_model_len
        return [entry]

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker after the requests already queued; a later request starts a new one."""
        with self._lock:
            worker, old = self._worker, self._queue
            self._worker = None
            self._queue = queue.SimpleQueue()
        if worker is not None:
            old.put(None)

    # ------------------------------------------------------------------ worker

    def _submit(self, body: Mapping[str, Any], deadline: float) -> Future[dict[str, Any]]:
        if remaining(deadline) <= 0:
            raise GuardTimeoutError("guard check deadline passed before the request was queued")
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._run, args=(self._queue,), name="flexguard-local", daemon=True
                )
                self._worker.start()
            self._queue.put(_Job(body, deadline, future))
        return future

    def _run(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        """Worker loop: one micro-batch per iteration until the stop marker."""
        while True:
            first = jobs.get()
            if first is None:
                return
            batch = [first]
            stop = False
            until = time.monotonic() + self.batch_window
            while len(batch) < self.max_batch_size:
                try:
                    wait = until - time.monotonic()
                    nxt = jobs.get(timeout=wait) if wait > 0 else jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                self._process(batch)
            except BaseException as exc:  # never leave a caller waiting forever
                logger.exception("local guard worker failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(GuardServerError(f"local guard worker failed: {exc!r}"))
            if stop:
                return

    def _process(self, batch: Sequence[_Job]) -> None:
        live: list[_Encoded] = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # the caller gave up while the job waited
            if remaining(job.deadline) <= 0:
                job.future.set_exception(GuardTimeoutError("guard check deadline passed while queued"))
                continue
            try:
                live.append(self._encode(job))
            except FlexGuardError as exc:
                job.future.set_exception(exc)
            except Exception as exc:
                job.future.set_exception(
                    GuardBadRequestError(f"the chat template could not render the request: {_first_line(exc)}")
                )
        if not live:
            return
        try:
            answers = self._generate(live)
        except Exception as exc:
            error = GuardServerError(f"the local guard model failed: {type(exc).__name__}: {_first_line(exc)}")
            for item in live:
                item.job.future.set_exception(error)
            return
        for item, answer in zip(live, answers, strict=True):
            item.job.future.set_result(answer)

    def _encode(self, job: _Job) -> _Encoded:
        """Render the messages with the model's chat template and tokenize; check the context length."""
        body = job.body
        messages = body.get("messages")
        if not isinstance(messages, Sequence) or not messages or not all(isinstance(m, Mapping) for m in messages):
            raise GuardBadRequestError("the local transport needs a chat request with a non-empty 'messages' list")
        max_new = body.get("max_tokens") or body.get("max_completion_tokens") or 64
        if not isinstance(max_new, int) or max_new < 1:
            raise GuardBadRequestError(f"max_tokens must be a positive integer, got {max_new!r}")
        top = 0
        if body.get("logprobs"):
            top = body.get("top_logprobs") or 1
            if not isinstance(top, int) or not 1 <= top <= 20:
                raise GuardBadRequestError(f"top_logprobs must be between 1 and 20, got {top!r}")
        template_kwargs = body.get("chat_template_kwargs") or {}
        text = self._tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True, **dict(template_kwargs)
        )
        ids = list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.max_model_len is not None and len(ids) + max_new > self.max_model_len:
            raise ContextLengthExceededError(
                f"the request has {len(ids)} prompt tokens and asks for {max_new} new ones, over the model's "
                f"context length of {self.max_model_len}",
                status_code=400,
                param="input_tokens",
            )
        return _Encoded(job, ids, max_new, top)

    def _generate(self, items: Sequence[_Encoded]) -> list[dict[str, Any]]:
        """One left-padded batch through ``generate``; one chat completion per item."""
        torch = self._torch
        width = max(len(it.ids) for it in items)
        input_ids = torch.full((len(items), width), self._pad_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            input_ids[row, width - len(it.ids) :] = torch.tensor(it.ids, dtype=torch.long)
            attention[row, width - len(it.ids) :] = 1
        want_scores = any(it.top_logprobs for it in items)
        with torch.inference_mode():
            out = self._model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max(it.max_new_tokens for it in items),
                do_sample=False,
                output_scores=want_scores,
                return_dict_in_generate=True,
            )
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        scores = None if isinstance(out, torch.Tensor) else getattr(out, "scores", None)
        new_tokens = sequences[:, width:].tolist()
        with self._lock:
            self._batches += 1
            self._requests += len(items)
            self._largest = max(self._largest, len(items))
        return [self._completion(it, new_tokens[row], row, scores, width) for row, it in enumerate(items)]

    def _completion(
        self, item: _Encoded, tokens: list[int], row: int, scores: Sequence[Any] | None, prompt_tokens: int
    ) -> dict[str, Any]:
        """The OpenAI chat-completion dict for one row: text up to the end token, finish reason, logprobs."""
        end = next((i for i, tok in enumerate(tokens) if tok in self._eos_ids), None)
        if end is not None and end < item.max_new_tokens:
            kept, finish = tokens[:end], "stop"
        else:  # no end token within this request's own budget (the batch may have had a larger one)
            kept, finish = tokens[: item.max_new_tokens], "length"
        text = self._tokenizer.decode(kept, skip_special_tokens=True)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }
        if item.top_logprobs and scores:
            choice["logprobs"] = {"content": self._logprobs(kept, row, scores, item.top_logprobs)}
        used = len(kept) + (1 if finish == "stop" else 0)
        return {
            "id": f"local-{id(item):x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [choice],
            "usage": {"prompt_tokens": len(item.ids), "completion_tokens": used,
                      "total_tokens": len(item.ids) + used},
        }  # fmt: skip

    def _logprobs(self, kept: Sequence[int], row: int, scores: Sequence[Any], k: int) -> list[dict[str, Any]]:
        """vLLM-shaped ``logprobs.content``: each generated token with its log-probability and the top k."""
        torch = self._torch
        entries: list[dict[str, Any]] = []
        for step, tok in enumerate(kept):
            if step >= len(scores):
                break
            logp = torch.log_softmax(scores[step][row].float(), dim=-1)
            values, indices = torch.topk(logp, k)
            top = [
                {"token": self._tokenizer.decode([int(i)]), "logprob": float(v)}
                for v, i in zip(values.tolist(), indices.tolist(), strict=True)
            ]
            entries.append({"token": self._tokenizer.decode([tok]), "logprob": float(logp[tok]), "top_logprobs": top})
        return entries


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
