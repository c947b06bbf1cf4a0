"""StrictnessPolicy: a pure function (verdict, surface) → Decision, loadable from YAML, a dict or code.

How a decision is made (DESIGN.md, "The strictness policy"):

1. A verdict with an ``error`` (the guard could not answer) is decided by ``on_error``: ``block``
   (default, fail-closed), ``allow`` (fail-open; the decision says so) or ``raise``.
2. A text whose risk score is under every applicable threshold is ALLOW. The applicable threshold is the
   lowest of the per-category thresholds of the verdict's categories, falling back to the base
   threshold (the preset's: strict 21, moderate 41, loose 61) for categories without their own.
3. A text over the threshold goes through ``rules`` in order (the surface's rules first); the first
   whose ``when`` matches decides. When none matches, the surface's ``action`` decides (default BLOCK).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import GuardUnavailableError, PolicyError
from .models.base import resolve_category
from .verdict import Action, Category, Decision, Surface, Verdict

Preset = Literal["strict", "moderate", "loose"]
OnError = Literal["block", "allow", "raise"]

PRESETS: dict[str, float] = {"strict": 21.0, "moderate": 41.0, "loose": 61.0}
"""Base thresholds: a text is over when ``risk_score >= threshold`` (FlexBench tiers LOW / MODERATE / HIGH)."""


def _parse_category(value: Any) -> Category:
    if isinstance(value, Category):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a category must be a name, not {type(value).__name__}")
    return resolve_category(value)


def _parse_surface(value: Any) -> Surface:
    if isinstance(value, Surface):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a surface must be a name, not {type(value).__name__}")
    return Surface.parse(value)


def _no_bool(value: Any) -> Any:
    """A score or threshold must be a number: YAML reads ``yes``, ``on`` and ``true`` as booleans, which
    pydantic would otherwise take for 1.0 (and ``false`` for 0.0, which blocks everything)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number from 0 to 100, not {str(value).lower()}")
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Outcome(_Frozen):
    """What a rule or a surface does with a text over the threshold: an action, and a route for REROUTE."""

    action: Action
    route: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, value: Any) -> Any:
        if isinstance(value, Outcome):
            return value
        if isinstance(value, Action):
            return {"action": value}
        if isinstance(value, str):
            name = value.strip().lower()
            if name.startswith("reroute:"):
                return {"action": Action.REROUTE, "route": value.split(":", 1)[1].strip()}
            if name == "reroute":
                raise ValueError("reroute needs a route name: write {reroute: NAME}")
            valid = {a.value for a in Action} - {"reroute"}
            if name not in valid:
                raise ValueError(
                    f"unknown action {value!r}; expected one of: {', '.join(sorted(valid))}, or {{reroute: NAME}}"
                )
            return {"action": name}
        if isinstance(value, Mapping) and set(value) == {"reroute"}:
            return {"action": Action.REROUTE, "route": value["reroute"]}
        return value

    @model_validator(mode="after")
    def _route_iff_reroute(self) -> Outcome:
        if self.action is Action.REROUTE and not self.route:
            raise ValueError("reroute needs a route name: write {reroute: NAME}")
        if self.action is not Action.REROUTE and self.route is not None:
            raise ValueError("only reroute takes a route name")
        return self

    def __str__(self) -> str:
        return f"reroute:{self.route}" if self.action is Action.REROUTE else self.action.value


class When(_Frozen):
    """Conditions of a rule; all given ones must hold. Categories match when the verdict has any of them."""

    min_score: float | None = Field(default=None, ge=0, le=100)
    max_score: float | None = Field(default=None, ge=0, le=100)
    categories: tuple[Category, ...] | None = None
    surfaces: tuple[Surface, ...] | None = None
    refusal: bool | None = None

    _scores = field_validator("min_score", "max_score", mode="before")(classmethod(lambda cls, v: _no_bool(v)))

    @field_validator("categories", mode="before")
    @classmethod
    def _cats(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        cats = tuple(_parse_category(v) for v in value)
        if not cats:
            raise ValueError("[] matches no verdict; leave categories out to match any category")
        return cats

    @field_validator("surfaces", mode="before")
    @classmethod
    def _surfaces(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str | Surface):
            value = [value]
        surfaces = tuple(_parse_surface(v) for v in value)
        if not surfaces:
            raise ValueError("[] matches no check; leave surfaces out to match every surface")
        return surfaces

    @model_validator(mode="after")
    def _range(self) -> When:
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ValueError(f"min_score {self.min_score:g} is greater than max_score {self.max_score:g}")
        return self

    def matches(self, verdict: Verdict, surface: Surface) -> bool:
        """True when every given condition holds for this verdict on this surface."""
        if self.min_score is not None and verdict.risk_score < self.min_score:
            return False
        if self.max_score is not None and verdict.risk_score > self.max_score:
            return False
        if self.categories is not None and not set(self.categories) & set(verdict.categories):
            return False
        if self.surfaces is not None and surface not in self.surfaces:
            return False
        return self.refusal is None or verdict.refusal is self.refusal


class Rule(_Frozen):
    """``when`` the verdict matches, ``then`` take this outcome."""

    when: When = When()
    then: Outcome
    name: str | None = None


def _thresholds(value: Any) -> Any:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("thresholds must be a mapping of category name to score")
    out: dict[Category, Any] = {}
    names: dict[Category, Any] = {}
    for key, score in value.items():
        cat = _parse_category(key)
        if cat in names:  # e.g. VIO and violence: keeping either value would drop the other silently
            raise ValueError(
                f"{_key_text(names[cat])} and {_key_text(key)} both name the category {cat.value}; give it once"
            )
        names[cat] = key
        if isinstance(score, bool):
            raise ValueError(f"threshold for {cat.value} must be a number from 0 to 100, not {str(score).lower()}")
        out[cat] = score
    return out


def _key_text(key: Any) -> str:
    return repr(key.value if isinstance(key, Category) else key)


class SurfacePolicy(_Frozen):
    """Overrides for one surface; anything left unset falls back to the policy's own setting."""

    preset: Preset | None = None
    threshold: float | None = Field(default=None, ge=0, le=100)
    thresholds: dict[Category, float] = Field(default_factory=dict)
    action: Outcome | None = None
    rules: tuple[Rule, ...] = ()
    on_error: OnError | None = None

    _normalise_thresholds = field_validator("thresholds", mode="before")(classmethod(lambda cls, v: _thresholds(v)))
    _threshold_number = field_validator("threshold", mode="before")(classmethod(lambda cls, v: _no_bool(v)))

    @field_validator("thresholds")
    @classmethod
    def _range(cls, value: dict[Category, float]) -> dict[Category, float]:
        for cat, score in value.items():
            if not 0 <= score <= 100:
                raise ValueError(f"threshold for {cat.value} is {score:g}; it must be within 0-100")
        return value


class StrictnessPolicy(_Frozen):
    """Presets, per-category thresholds, per-surface overrides, ordered rules and ``on_error``.

    >>> StrictnessPolicy(preset="strict").base_threshold()
    21.0
    """

    preset: Preset = "moderate"
    threshold: float | None = Field(default=None, ge=0, le=100)
    """Base threshold; overrides the preset's when set."""
    on_error: OnError = "block"
    thresholds: dict[Category, float] = Field(default_factory=dict)
    surfaces: dict[Surface, SurfacePolicy] = Field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    action: Outcome = Outcome(action=Action.BLOCK)
    """What a text over the threshold gets when no rule matches (per surface: ``surfaces.X.action``)."""
    name: str | None = None

    _normalise_thresholds = field_validator("thresholds", mode="before")(classmethod(lambda cls, v: _thresholds(v)))
    _threshold_number = field_validator("threshold", mode="before")(classmethod(lambda cls, v: _no_bool(v)))

    @field_validator("thresholds")
    @classmethod
    def _range(cls, value: dict[Category, float]) -> dict[Category, float]:
        for cat, score in value.items():
            if not 0 <= score <= 100:
                raise ValueError(f"threshold for {cat.value} is {score:g}; it must be within 0-100")
        return value

    @field_validator("surfaces", mode="before")
    @classmethod
    def _surface_keys(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError("surfaces must be a mapping of surface name to overrides")
        out: dict[Surface, Any] = {}
        names: dict[Surface, Any] = {}
        for key, overrides in value.items():
            surface = _parse_surface(key)
            if surface in names:  # e.g. tool_call and TOOL_CALL: keeping either would drop the other silently
                raise ValueError(
                    f"{_key_text(names[surface])} and {_key_text(key)} both name the surface {surface.value}; "
                    "give it once"
                )
            names[surface] = key
            out[surface] = {} if overrides is None else overrides
        return out

    # ----------------------------------------------------------------- thresholds

    def base_threshold(self, surface: Surface | str = Surface.PROMPT) -> float:
        """The threshold for categories without their own, on ``surface``."""
        return self._base(self.surfaces.get(Surface.parse(surface)))

    def _base(self, sp: SurfacePolicy | None) -> float:
        if sp is not None:
            if sp.threshold is not None:
                return sp.threshold
            if sp.preset is not None:
                return PRESETS[sp.preset]
        return self.threshold if self.threshold is not None else PRESETS[self.preset]

    def category_threshold(self, category: Category, surface: Surface | str = Surface.PROMPT) -> float:
        """The threshold that applies to ``category`` on ``surface``."""
        surface = Surface.parse(surface)
        sp = self.surfaces.get(surface)
        if sp is not None and category in sp.thresholds:
            return sp.thresholds[category]
        if category in self.thresholds:
            return self.thresholds[category]
        return self.base_threshold(surface)

    def threshold_for(self, verdict: Verdict, surface: Surface | str = Surface.PROMPT) -> float:
        """The applicable threshold: the lowest among the verdict's categories (base when it has none)."""
        return self._threshold(verdict, self.surfaces.get(Surface.parse(surface)))

    def _threshold(self, verdict: Verdict, sp: SurfacePolicy | None) -> float:
        """:meth:`threshold_for` with the surface's overrides already looked up (on every check: kept lean)."""
        base = self._base(sp)
        own = sp.thresholds if sp is not None else None
        if not verdict.categories or (not own and not self.thresholds):
            return base
        own = own or {}
        return min(own[c] if c in own else self.thresholds.get(c, base) for c in verdict.categories)

    def is_over(self, verdict: Verdict, surface: Surface | str = Surface.PROMPT) -> bool:
        """True when the verdict is over its applicable threshold; a failed verdict always counts as over."""
        return verdict.error is not None or verdict.risk_score >= self.threshold_for(verdict, surface)

    def on_error_for(self, surface: Surface | str = Surface.PROMPT) -> OnError:
        """``on_error`` for ``surface`` (its override, else the policy's)."""
        sp = self.surfaces.get(Surface.parse(surface))
        return sp.on_error if sp is not None and sp.on_error is not None else self.on_error

    # ----------------------------------------------------------------- deciding

    @property
    def label(self) -> str:
        """Short name for logs and decisions: the name given, else the preset."""
        return self.name or self.preset

    def decide(self, verdict: Verdict, surface: Surface | str | None = None) -> Decision:
        """Decide what to do with a text given its verdict. Pure; raises only for ``on_error: raise``."""
        if surface is None:
            surface = verdict.surface or Surface.PROMPT
        elif type(surface) is not Surface:
            surface = Surface.parse(surface)
        sp = self.surfaces.get(surface) if self.surfaces else None
        label = self.name or self.preset

        if verdict.error is not None:
            mode = self.on_error_for(surface)
            if mode == "allow":
                return Decision(
                    action=Action.ALLOW,
                    verdict=verdict,
                    reason=f"guard unavailable ({verdict.error}); allowed by on_error=allow (FAIL-OPEN)",
                    rule="on_error",
                    fail_open=True,
                    surface=surface,
                    policy=label,
                )
            blocked = Decision(
                action=Action.BLOCK,
                verdict=verdict,
                reason=f"guard unavailable ({verdict.error}); blocked by on_error=block (fail-closed)",
                rule="on_error",
                surface=surface,
                policy=label,
            )
            if mode == "raise":
                raise GuardUnavailableError(f"guard unavailable: {verdict.error}", decision=blocked)
            return blocked

        threshold = self._threshold(verdict, sp)
        cats = ", ".join(verdict.categories) or "no category"  # str-valued enums: join reads their values
        if verdict.risk_score < threshold:
            return Decision(
                action=Action.ALLOW,
                verdict=verdict,
                reason=f"risk {verdict.risk_score:g} < threshold {threshold:g} ({cats})",
                rule="threshold",
                threshold=threshold,
                surface=surface,
                policy=label,
            )
        outcome, rule_name = self._outcome(verdict, surface, sp)
        return Decision(
            action=outcome.action,
            verdict=verdict,
            route=outcome.route,
            reason=f"risk {verdict.risk_score:g} >= threshold {threshold:g} ({cats}); {rule_name} -> {outcome}",
            rule=rule_name,
            threshold=threshold,
            surface=surface,
            policy=label,
        )

    def _outcome(self, verdict: Verdict, surface: Surface, sp: SurfacePolicy | None) -> tuple[Outcome, str]:
        """For a verdict over the threshold: the first matching rule (the surface's first), else the action."""
        if sp is not None:
            for i, rule in enumerate(sp.rules):
                if rule.when.matches(verdict, surface):
                    name = f"surfaces.{surface.value}.rules[{i}]"
                    return rule.then, f"{name} {rule.name}" if rule.name else name
        for i, rule in enumerate(self.rules):
            if rule.when.matches(verdict, surface):
                name = f"rules[{i}]"
                return rule.then, f"{name} {rule.name}" if rule.name else name
        if sp is not None and sp.action is not None:
            return sp.action, f"surfaces.{surface.value}.action"
        return self.action, "action"

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> StrictnessPolicy:
        """A preset policy (strict, moderate, loose), optionally with overrides."""
        key = name.strip().lower()
        if key not in PRESETS:
            raise PolicyError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
        return cls.from_dict({"preset": key, **overrides}, source=f"preset {key!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "policy") -> StrictnessPolicy:
        """Validate a mapping; a PolicyError names the offending key and the problem."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"{source}: a policy must be a mapping, not {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = "unknown key"
                problems.append(f"{loc}: {msg}")
            raise PolicyError(f"{source}: invalid policy: " + "; ".join(problems)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> StrictnessPolicy:
        """Load a policy YAML file."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {str(path)!r}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise PolicyError(
                f"policy file {str(path)!r} is not valid UTF-8 (byte {exc.start}: {exc.reason}); save it as UTF-8"
            ) from None
        try:
            data = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise PolicyError(f"{path}: malformed YAML{where}: {problem}") from None
        if data is None:
            data = {}
        if isinstance(data, Mapping) and "name" not in data:
            data = {**data, "name": path.stem}
        return cls.from_dict(data, source=str(path))

    @classmethod
    def load(cls, spec: StrictnessPolicy | Mapping[str, Any] | str | Path | None) -> StrictnessPolicy:
        """Accept what users pass as ``policy=``: a policy, a preset name, a dict, a YAML path, or None."""
        if spec is None:
            return cls.from_preset("moderate")
        if isinstance(spec, StrictnessPolicy):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, Path):
            return cls.from_yaml(spec)
        if isinstance(spec, str):
            if spec.strip().lower() in PRESETS:
                return cls.from_preset(spec)
            if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
                return cls.from_yaml(spec)
            raise PolicyError(f"policy {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing YAML file")
        raise PolicyError(f"cannot make a policy from {type(spec).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`from_dict` reads back to an equal policy."""
        return self.model_dump(mode="json", exclude_defaults=True)


@functools.cache
def _unique_key_loader() -> type[Any]:
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error (PyYAML keeps the last
    value silently: ``VIO: 30`` then ``VIO: 60`` would drop a threshold without a word). Merge keys
    (``<<: *anchor``) may still be overridden."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def flatten_mapping(self, node: Any) -> None:
            # the check runs on a mapping's own keys, before PyYAML merges anchors into it (in place, and
            # possibly while loading another mapping that merges this one), and once per mapping node
            seen: set[int] = self.__dict__.setdefault("_unique_checked", set())
            if id(node) not in seen:
                seen.add(id(node))
                first: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"):
                        continue
                    key = self.construct_object(key_node, deep=False)
                    try:
                        earlier = first.setdefault(key, key_node.start_mark)
                    except TypeError:  # an unhashable key: the base constructor reports it
                        continue
                    if earlier is not key_node.start_mark:
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"key {key!r} is given twice in one mapping (first at line {earlier.line + 1}, "
                            f"column {earlier.column + 1})",
                            key_node.start_mark,
                        )
            super().flatten_mapping(node)

    return UniqueKeyLoader
