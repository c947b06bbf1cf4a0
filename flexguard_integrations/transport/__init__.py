"""How a request reaches a guard model: HTTP (httpx, the default), a user's openai client, aiohttp."""

from .base import RetryPolicy, Transport, error_from_response
from .http import HTTPTransport

__all__ = ["HTTPTransport", "RetryPolicy", "Transport", "error_from_response"]
