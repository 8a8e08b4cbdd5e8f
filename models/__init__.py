"""Cross-domain sequential recommendation backbones (each accepts GCA positions).

`build_model(name, n_items_a, n_items_b, config)` is the only entry point the pipeline uses.
Register a model with one line in `_REGISTRY` below.
"""

from __future__ import annotations

from typing import Any, Dict, Type

from models.base import Recommender, n_trainable
from models.sasrec import SASRec
from models.abxi import ABXI
from models.llm4cdsr import LLM4CDSR
from models.cdsrnp import CDSRNP

_REGISTRY: Dict[str, Type[Recommender]] = {
    "sasrec": SASRec,
    "abxi": ABXI,
    "llm4cdsr": LLM4CDSR,
    "cdsrnp": CDSRNP,
}

MODEL_NAMES = tuple(_REGISTRY)


def model_class(name: str) -> Type[Recommender]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_model(name: str, n_items_a: int, n_items_b: int, config: Dict[str, Any] | None = None) -> Recommender:
    return model_class(name)(n_items_a, n_items_b, dict(config or {}))


__all__ = ["Recommender", "build_model", "model_class", "MODEL_NAMES", "n_trainable"]
