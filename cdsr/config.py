"""Run configuration: one flat dict (pipeline keys + the model's own keys).

The pipeline's keys and defaults live here; each model's live in its `default_config()`.
`--set key=value` reaches any of them, so a model adding a hyper-parameter needs no CLI change.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, Optional

import models

DATA_NAMES = ("synthetic", "abe", "afk", "csv")

PIPELINE_DEFAULTS: Dict[str, Any] = {
    "model": "sasrec",
    "data": "synthetic",
    "data_dir": None,
    # raw ratings CSVs (data = csv)
    "csv_a": None,
    "csv_b": None,
    "csv_order": "auto",
    "cache_dir": None,
    "item_min": 10,
    "max_per_user": 50,
    "user_min_per_domain": 5,
    # synthetic data (data = synthetic): a preset, optionally overridden field by field
    "synthetic_preset": "small",
    "syn_users": None,
    "syn_items_a": None,
    "syn_items_b": None,
    "syn_mean_len": None,
    "syn_signal": None,
    "data_seed": 0,
    # training
    "seed": 0,
    "epochs": 20,
    "batch_size": 128,
    "lr": 2e-3,
    "weight_decay": 0.01,
    "warmup_epochs": 1,
    "grad_clip": 5.0,
    "patience": 3,
    "early_stop_metric": "mrr",
    "max_len": 50,
    # evaluation
    "eval_negatives": 999,
    "eval_batch_size": 256,
    "eval_seed": 0,
    # execution
    "device": "cpu",
    "threads": 1,  # intra-op CPU threads: 1 is robust on shared or small machines; --set threads=N
    "progress": "auto",
    "find_unused_parameters": True,
}

# Keys that may differ between a run and its --resume (they do not change the result).
RESUMABLE_KEYS = {"device", "threads", "progress", "out", "resume", "epochs", "data_dir", "cache_dir"}


class ConfigError(ValueError):
    pass


def model_defaults(model: str) -> Dict[str, Any]:
    return models.model_class(model).default_config()


def valid_keys(model: str) -> Dict[str, Any]:
    """Every key a run of `model` accepts, with its default. A model's `default_config()` may
    also override pipeline defaults (e.g. ABXI's lr and weight decay): the model's value wins."""
    out = dict(PIPELINE_DEFAULTS)
    out.update(model_defaults(model))
    return out


def parse_value(key: str, text: str, default: Any) -> Any:
    """Parse a --set value: JSON first (numbers, lists, true/false/null), else a string;
    then coerce to the default's type where that is unambiguous."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        value = {"true": True, "false": False, "none": None}.get(lowered, text)
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"--set {key}: expected true/false, got {text!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"--set {key}: expected an integer, got {text!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"--set {key}: expected a number, got {text!r}")
        return float(value)
    if isinstance(default, list):
        if isinstance(value, int):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"--set {key}: expected a list like [0,1], got {text!r}")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        return text
    return value


def make_config(model: str, overrides: Optional[Dict[str, Any]] = None,
                sets: Iterable[str] = ()) -> Dict[str, Any]:
    """Defaults <- explicit overrides (from named CLI options) <- `key=value` strings."""
    try:
        keys = valid_keys(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg = dict(keys)
    cfg["model"] = model
    for k, v in (overrides or {}).items():
        if k not in keys:
            raise ConfigError(f"unknown config key {k!r}; valid keys: {', '.join(sorted(keys))}")
        cfg[k] = v
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, text = item.split("=", 1)
        k = k.strip()
        if k not in keys:
            raise ConfigError(f"--set: unknown key {k!r}; valid keys: {', '.join(sorted(keys))}")
        cfg[k] = parse_value(k, text.strip(), keys[k])
    check(cfg)
    return cfg


def check(cfg: Dict[str, Any]) -> None:
    if cfg["data"] not in DATA_NAMES:
        raise ConfigError(f"unknown data {cfg['data']!r}; valid choices: {', '.join(DATA_NAMES)}")
    if cfg["device"] not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {cfg['device']!r}")
    for k in ("epochs", "batch_size", "max_len", "eval_negatives", "eval_batch_size", "patience"):
        if not isinstance(cfg[k], int) or cfg[k] < 1:
            raise ConfigError(f"{k} must be a positive integer, got {cfg[k]!r}")
    if cfg["early_stop_metric"] not in ("mrr", "auc") and not cfg["early_stop_metric"].startswith(("hr@", "ndcg@")):
        raise ConfigError(f"early_stop_metric must be mrr, auc, hr@k or ndcg@k, got {cfg['early_stop_metric']!r}")
    if cfg["progress"] not in ("auto", "always", "never"):
        raise ConfigError(f"progress must be auto, always or never, got {cfg['progress']!r}")
    if cfg["data"] == "csv" and not (cfg["csv_a"] and cfg["csv_b"]):
        raise ConfigError("--data csv needs --csv-a PATH and --csv-b PATH (raw ratings files)")
    # The model validates its own keys (GCA positions, activation, sizes) when resolving.
    try:
        models.model_class(cfg["model"]).resolve_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
