"""One exception tree, named by what happened, so callers can catch by meaning."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .verdict import Decision


class FlexGuardError(Exception):
    """Base class of every exception this package raises."""


class ConfigurationError(FlexGuardError, ValueError):
    """A setting is wrong: an unknown family or model, a bad URL, a bad option value."""


class PolicyError(ConfigurationError):
    """A strictness policy could not be loaded: bad YAML, an unknown key, category or preset."""


class GuardInputError(FlexGuardError, ValueError):
    """The text to check cannot be checked as given (empty, not a string, too large)."""


class GuardBlockedError(FlexGuardError):
    """Raised by integrations asked to raise on BLOCK; carries the decision."""

    def __init__(self, decision: Decision, message: str | None = None) -> None:
        self.decision = decision
        super().__init__(message or f"blocked by guard: {decision.reason}")


class GuardUnavailableError(FlexGuardError):
    """The guard could not answer and the policy says ``on_error: raise``. Carries the failed decision."""

    def __init__(self, message: str, decision: Decision | None = None) -> None:
        self.decision = decision
        super().__init__(message)


class GuardTransportError(FlexGuardError):
    """The guard server could not be reached or answered with an error."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        self.param = param
        self.retry_after = retry_after


class GuardConnectionError(GuardTransportError):
    """No connection could be made, or it dropped before an answer."""

    retryable = True


class GuardTimeoutError(GuardTransportError):
    """No answer within the deadline."""

    retryable = True


class GuardOverloadedError(GuardTransportError):
    """502/503/504: the server or a gateway is busy or restarting (vLLM and SGLang never send 429)."""

    retryable = True


class GuardServerError(GuardTransportError):
    """The server failed with a 5xx that retrying will not fix (e.g. vLLM's EngineDeadError 500)."""


class GuardAuthenticationError(GuardTransportError):
    """401/403: missing or wrong API key."""


class GuardBadRequestError(GuardTransportError):
    """4xx: the server rejected the request (never retried)."""


class ContextLengthExceededError(GuardBadRequestError):
    """The text is too long for the guard: a 400 saying the prompt exceeds the model's context, or a 413 (a
    request body over a proxy's or the server's size limit). The guard re-splits the text and retries."""


class GuardResponseError(GuardTransportError):
    """A 2xx answer that is not a chat completion: HTML, an empty body, or another JSON shape."""
