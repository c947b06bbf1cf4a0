"""Moderate a Ray Data dataset across a Ray cluster (extra ``ray``: ``ray[data]``).

For corpora that outgrow one machine: :func:`moderate_dataset` maps batches of a ``ray.data.Dataset``
through the guard endpoint with ``Dataset.map_batches`` and a callable class, :class:`GuardBatchMapper`, of
which Ray starts ``num_workers`` actors; each builds its own :class:`~flexguard_integrations.Guard` once (a
Guard holds connection pools, which cannot be pickled) and checks the rows of each batch concurrently.

    import ray
    from flexguard_integrations.ray import moderate_dataset

    ds = ray.data.read_json("s3://bucket/corpus/")
    out = moderate_dataset(ds, base_url="http://guard-router:8000/v1", model="Qwen/Qwen3Guard-Gen-8B",
                           policy="strict", text_column="text", num_workers=8, concurrency=32)
    out.filter(lambda r: r["flexguard_action"] == "allow").write_parquet("s3://bucket/clean/")

Output columns added to every row: ``flexguard_action``, ``flexguard_risk_score`` (None when the guard could
not answer), ``flexguard_categories`` (comma-separated unified names), ``flexguard_reason``,
``flexguard_error`` (None, or why no verdict could be read), ``flexguard_fail_open``. A row that cannot be
checked (empty text, guard failure) carries the error and the fail-closed decision (``block``, or what the
policy's ``on_error`` says for guard failures). The total throughput is ``num_workers × concurrency``
requests in flight: size it for the guard servers, not for the Ray cluster.

This module imports Ray only when a function is called, so ``import flexguard_integrations.ray`` works
without it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping
from typing import Any

from .guard import Guard
from .verdict import Action, Decision

__all__ = ["OUTPUT_COLUMNS", "GuardBatchMapper", "moderate_dataset", "require_ray"]

OUTPUT_COLUMNS: tuple[str, ...] = (
    "flexguard_action",
    "flexguard_risk_score",
    "flexguard_categories",
    "flexguard_reason",
    "flexguard_error",
    "flexguard_fail_open",
)

RAY_HINT = "this needs Ray Data: pip install 'flexguard-integrations[ray]'"


def require_ray() -> Any:
    """The ``ray`` module; ImportError with the install hint when it is missing."""
    try:
        importlib.import_module("ray.data")
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ImportError(f"{RAY_HINT} ({exc})") from exc


def _cell(value: Any) -> Any:
    """A plain Python value from a numpy / pyarrow scalar."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, str | bytes):
        try:
            return item()
        except (TypeError, ValueError):
            return value
    return value


class GuardBatchMapper:
    """The callable class given to ``map_batches``: one Guard per Ray actor, one concurrent batch per call.

    ``guard_options`` are the keyword arguments of :meth:`Guard.from_endpoint` (``base_url``, ``model``,
    ``family``, ``policy``, ``timeout``, ``api_key``, ``concurrency``...). Batches are dicts of column name to
    sequence (Ray's ``numpy`` batch format, or plain lists); the result has the same columns plus
    :data:`OUTPUT_COLUMNS`.
    """

    def __init__(
        self,
        guard_options: Mapping[str, Any],
        text_column: str = "text",
        response_column: str | None = None,
        surface: str | None = None,
    ) -> None:
        self.guard = Guard.from_endpoint(**dict(guard_options))
        self.text_column = text_column
        self.response_column = response_column
        self.surface = surface

    def _check_all(self, texts: list[Any], responses: list[Any]) -> list[Decision | str]:
        """A Decision per row, or the error text for a row that could not be checked."""
        out: list[Decision | str | None] = [None] * len(texts)
        items: list[tuple[int, Any]] = []
        for i, (text, raw_response) in enumerate(zip(texts, responses, strict=True)):
            if not isinstance(text, str) or not text.strip():
                out[i] = "the text is empty or not a string"
                continue
            response = raw_response if isinstance(raw_response, str) and raw_response.strip() else None
            surface = self.surface or ("response" if response is not None else "retrieved")
            items.append((i, {"text": text, "response": response, "surface": surface}))
        results = self.guard.batch([item for _, item in items], return_exceptions=True)
        for (i, _), result in zip(items, results, strict=True):
            if isinstance(result, Decision):
                out[i] = result
            else:
                decision = getattr(result, "decision", None)  # GuardUnavailableError under on_error: raise
                out[i] = decision if isinstance(decision, Decision) else f"{type(result).__name__}: {result}"
        return [o if o is not None else "not checked" for o in out]

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.text_column not in batch:
            raise KeyError(f"the dataset has no column {self.text_column!r}; columns: {', '.join(batch)}")
        texts = [_cell(t) for t in batch[self.text_column]]
        if self.response_column and self.response_column in batch:
            responses = [_cell(r) for r in batch[self.response_column]]
        else:
            responses = [None] * len(texts)
        columns: dict[str, list[Any]] = {name: [] for name in OUTPUT_COLUMNS}
        for result in self._check_all(texts, responses):
            if isinstance(result, Decision):
                v = result.verdict
                values: tuple[Any, ...] = (
                    result.action.value,
                    None if v.error is not None else float(v.risk_score),
                    ",".join(c.value for c in v.categories),
                    result.reason,
                    v.error,
                    result.fail_open,
                )
            else:
                values = (Action.BLOCK.value, None, "", f"not checked ({result}); blocked (fail-closed)", result,
                          False)  # fmt: skip
            for name, value in zip(OUTPUT_COLUMNS, values, strict=True):
                columns[name].append(value)
        return {**{k: list(v) for k, v in batch.items()}, **columns}

    def __del__(self) -> None:
        guard = getattr(self, "guard", None)
        if guard is not None:
            with contextlib.suppress(Exception):  # interpreter shutdown
                guard.close()


def moderate_dataset(
    dataset: Any,
    *,
    base_url: str,
    model: str,
    family: str | None = None,
    policy: Any = "moderate",
    text_column: str = "text",
    response_column: str | None = None,
    surface: str | None = None,
    num_workers: int = 2,
    concurrency: int = 16,
    batch_size: int = 64,
    timeout: float = 30.0,
    num_cpus: float = 0.25,
    **guard_options: Any,
) -> Any:
    """A lazily moderated copy of ``dataset`` (a ``ray.data.Dataset``) with :data:`OUTPUT_COLUMNS` added.

    ``num_workers`` actors each hold one Guard with ``concurrency`` checks in flight; ``batch_size`` rows
    go to an actor at a time. ``num_cpus`` per actor is small because the work is waiting on the network.
    ``policy`` is a preset, a dict or a YAML path readable on every node (a dict travels best).
    """
    require_ray()
    if num_workers < 1 or concurrency < 1 or batch_size < 1:
        raise ValueError("num_workers, concurrency and batch_size must be at least 1")
    if hasattr(policy, "to_dict"):
        policy = policy.to_dict()
    options = {
        "base_url": base_url,
        "model": model,
        "family": family,
        "policy": policy,
        "timeout": timeout,
        "concurrency": concurrency,
        **guard_options,
    }
    return dataset.map_batches(
        GuardBatchMapper,
        fn_constructor_kwargs={
            "guard_options": options,
            "text_column": text_column,
            "response_column": response_column,
            "surface": surface,
        },
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=num_workers,
        num_cpus=num_cpus,
    )
