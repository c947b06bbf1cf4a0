"""Guard families: build the request, parse the answer into a Verdict. Pure, no I/O.

One module per family; a new family (Llama Guard, say) is one new module that subclasses
:class:`GuardModel` and is decorated with :func:`register`.
"""

from .base import (
    GuardInput,
    GuardModel,
    category_aliases,
    create_model,
    families,
    get_family,
    infer_family,
    register,
    resolve_category,
)
from .flexguard import FlexGuardModel
from .qwen3guard import Qwen3GuardModel

__all__ = [
    "FlexGuardModel",
    "GuardInput",
    "GuardModel",
    "Qwen3GuardModel",
    "category_aliases",
    "create_model",
    "families",
    "get_family",
    "infer_family",
    "register",
    "resolve_category",
]
