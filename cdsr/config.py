"""Run configuration: one flat dict (pipeline keys + the model's own keys).

The pipeline's keys and defaults live here; each model's live in its `default_config()`.
`--set key=value` reaches any of them, so a model adding a hyper-parameter needs no CLI change.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from typing import Any, Dict, Iterable, Optional, Set

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
    # step: lr rises linearly every optimiser step over warmup_epochs epochs; epoch: it steps
    # once per epoch from 1e-5 x lr, as the ABXI authors' LinearLR (start_factor 1e-5)
    "warmup_unit": "step",
    # plateau decay: lr x lr_plateau_factor on the (lr_plateau_patience + 1)-th validation
    # epoch in a row without improvement (torch's ReduceLROnPlateau rule); 0 = off
    "lr_plateau_patience": 0,
    "lr_plateau_factor": 0.3162,
    "grad_clip": 5.0,
    "patience": 3,
    "early_stop_metric": "mrr",
    "max_len": 50,
    # training negatives (cdsr/batching.py): per_user = the model's few per position, with
    # replacement; per_position = the ABXI authors' draw (distinct, none of the user's items)
    "neg_sampling": "per_user",
    # per_position: negatives per position and domain; 0 = the model's own count
    "train_negatives": 0,
    # evaluation
    # 999 is the paper's protocol; a synthetic preset may lower the default (`derived_defaults`).
    "eval_negatives": 999,
    "eval_batch_size": 256,
    "eval_seed": 0,
    # execution
    "device": "cpu",
    # intra-op CPU threads; 0 = every core this process may run on (shared among the ranks of
    # a torchrun job on one machine); --set threads=N fixes the number.
    "threads": 0,
    "progress": "auto",
    "find_unused_parameters": True,
}

# Keys that may differ between a run and its --resume (they do not change the result).
RESUMABLE_KEYS = {"device", "threads", "progress", "out", "resume", "epochs", "data_dir", "cache_dir"}


# Keys whose default leaves a run as it was before the key existed: at that value they are
# left out of a run's identity (its folder hash, the resume check), so runs recorded without
# them keep their folders and resume.
QUIET_DEFAULTS = {"warmup_unit": "step", "lr_plateau_patience": 0, "lr_plateau_factor": 0.3162,
                  "neg_sampling": "per_user", "train_negatives": 0, "align_reg": 0.0}


def comparable(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """`cfg` without the QUIET_DEFAULTS keys that hold their default."""
    return {k: v for k, v in cfg.items() if not (k in QUIET_DEFAULTS and v == QUIET_DEFAULTS[k])}


# Keys that name files or folders: a --set value is kept as the text given.
PATH_KEYS = {"data_dir", "csv_a", "csv_b", "cache_dir", "emb_global_npy", "emb_a_npy", "emb_b_npy", "emb_cache_dir"}


class ConfigError(ValueError):
    pass


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's
    share), not the machine's total."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_threads(cfg: Dict[str, Any]) -> int:
    """Torch intra-op threads of a run: `threads`, or with 0 (the default) the available cores
    divided among the processes torchrun started on this machine."""
    n = int(cfg.get("threads") or 0)
    if n > 0:
        return n
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1)
    return max(1, available_cores() // max(1, local_world))


def derived_defaults(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults that follow from other settings: a synthetic preset's own defaults (the
    `tiny` preset's domains have 40 / 60 items, too few for 999 evaluation negatives, so it
    defaults eval_negatives to 20). Applied only to keys the user did not set."""
    if cfg.get("data") == "synthetic":
        from cdsr.synthetic import PRESET_DEFAULTS

        return dict(PRESET_DEFAULTS.get(cfg.get("synthetic_preset"), {}))
    return {}


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
    if key in PATH_KEYS:
        return None if value is None else text
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


def _unknown_key(key: str, model: str, keys: Dict[str, Any], where: str) -> ConfigError:
    others = [m for m in models.MODEL_NAMES if m != model and key in valid_keys(m)]
    if others:
        return ConfigError(f"{where}model {model} has no config key {key!r} (models with it: {', '.join(others)})")
    close = difflib.get_close_matches(key, list(keys), n=2)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return ConfigError(f"{where}unknown key {key!r}; {hint}valid keys: {', '.join(sorted(keys))}")


def make_config(model: str, overrides: Optional[Dict[str, Any]] = None,
                sets: Iterable[str] = ()) -> Dict[str, Any]:
    """Defaults <- explicit overrides (from named CLI options) <- `key=value` strings."""
    try:
        keys = valid_keys(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg = dict(keys)
    cfg["model"] = model
    given: Set[str] = set()
    for k, v in (overrides or {}).items():
        if k not in keys:
            raise _unknown_key(k, model, keys, "")
        cfg[k] = v
        given.add(k)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, text = item.split("=", 1)
        k = k.strip()
        if k not in keys:
            raise _unknown_key(k, model, keys, "--set: ")
        cfg[k] = parse_value(k, text.strip(), keys[k])
        given.add(k)
    cfg.update({k: v for k, v in derived_defaults(cfg).items() if k in keys and k not in given})
    check(cfg)
    return cfg


def default_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The config a run of the same model on the same data would have with nothing else set,
    except that defaults derived from `cfg`'s data (its synthetic preset's) count as defaults:
    the comparison point of run folder names. Not validated."""
    out = valid_keys(cfg["model"])
    out["model"] = cfg["model"]
    out["data"] = cfg.get("data", out["data"])
    derived = derived_defaults({"data": out["data"], "synthetic_preset": cfg.get("synthetic_preset")})
    out.update({k: v for k, v in derived.items() if k in out})
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_int_list(cfg: Dict[str, Any], key: str) -> None:
    v = cfg.get(key)
    if v is None or _is_int(v):
        return
    if not isinstance(v, list) or not all(_is_int(p) for p in v):
        raise ConfigError(f"{key} must be a list of integers like [0,1], got {v!r}")


def check(cfg: Dict[str, Any]) -> None:
    """Every pipeline key's type and range (a wrong value is a one-line error here, not a
    traceback from deep inside a run); the model checks its own keys."""
    if cfg["data"] not in DATA_NAMES:
        raise ConfigError(f"unknown data {cfg['data']!r}; valid choices: {', '.join(DATA_NAMES)}")
    if cfg["device"] not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {cfg['device']!r}")
    for k in ("epochs", "batch_size", "max_len", "eval_negatives", "eval_batch_size", "patience",
              "item_min", "max_per_user", "user_min_per_domain"):
        if not _is_int(cfg[k]) or cfg[k] < 1:
            raise ConfigError(f"{k} must be a positive integer, got {cfg[k]!r}")
    for k in ("seed", "data_seed", "eval_seed", "threads", "lr_plateau_patience", "train_negatives"):
        if not _is_int(cfg[k]) or cfg[k] < 0:
            raise ConfigError(f"{k} must be a non-negative integer, got {cfg[k]!r}")
    if not _is_number(cfg["lr"]) or cfg["lr"] <= 0:
        raise ConfigError(f"lr must be a positive number, got {cfg['lr']!r}")
    for k in ("weight_decay", "warmup_epochs", "grad_clip"):
        if not _is_number(cfg[k]) or cfg[k] < 0:
            raise ConfigError(f"{k} must be a number >= 0, got {cfg[k]!r}")
    if not _is_number(cfg["lr_plateau_factor"]) or not 0 < cfg["lr_plateau_factor"] < 1:
        raise ConfigError(f"lr_plateau_factor must be a number in (0, 1), got {cfg['lr_plateau_factor']!r}")
    if cfg["warmup_unit"] not in ("step", "epoch"):
        raise ConfigError(f"warmup_unit must be step or epoch, got {cfg['warmup_unit']!r}")
    from cdsr.batching import NEG_SAMPLING

    if cfg["neg_sampling"] not in NEG_SAMPLING:
        raise ConfigError(f"neg_sampling must be one of {', '.join(NEG_SAMPLING)}, got {cfg['neg_sampling']!r}")
    for k in ("find_unused_parameters",):
        if not isinstance(cfg[k], bool):
            raise ConfigError(f"{k} must be true or false, got {cfg[k]!r}")
    for k in PATH_KEYS:
        if cfg.get(k) is not None and (not isinstance(cfg[k], str) or not cfg[k]):
            raise ConfigError(f"{k} must be a path, got {cfg[k]!r}")
    _check_synthetic(cfg)
    from cdsr.loaders import CSV_ORDERS

    if cfg["csv_order"] not in CSV_ORDERS:
        raise ConfigError(f"csv_order must be one of {', '.join(CSV_ORDERS)}, got {cfg['csv_order']!r}")
    if cfg["early_stop_metric"] not in ("mrr", "auc") and not cfg["early_stop_metric"].startswith(("hr@", "ndcg@")):
        raise ConfigError(f"early_stop_metric must be mrr, auc, hr@k or ndcg@k, got {cfg['early_stop_metric']!r}")
    if cfg["progress"] not in ("auto", "always", "never"):
        raise ConfigError(f"progress must be auto, always or never, got {cfg['progress']!r}")
    if cfg["data"] == "csv" and not (cfg["csv_a"] and cfg["csv_b"]):
        raise ConfigError("--data csv needs --csv-a PATH and --csv-b PATH (raw ratings files)")
    _check_int_list(cfg, "gca_positions")
    _check_int_list(cfg, "scale_to_match")
    # The model validates its own keys (GCA positions, activation, sizes) when resolving.
    try:
        models.model_class(cfg["model"]).resolve_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_synthetic(cfg: Dict[str, Any]) -> None:
    from dataclasses import replace

    from cdsr.synthetic import PRESETS, SYNTHETIC_KEYS

    preset = cfg["synthetic_preset"]
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic_preset {preset!r}; valid choices: {', '.join(PRESETS)}")
    fields = {}
    for field_name, key in SYNTHETIC_KEYS.items():
        v = cfg.get(key)
        if v is None:
            continue
        integer = field_name not in ("mean_len", "signal")
        if (integer and not _is_int(v)) or (not integer and not _is_number(v)):
            raise ConfigError(f"{key} must be {'an integer' if integer else 'a number'}, got {v!r}")
        try:
            replace(PRESETS[preset], **{field_name: v})
        except ValueError as e:
            raise ConfigError(f"{key}={v}: {e}") from None
        fields[field_name] = v
    try:
        replace(PRESETS[preset], **fields)
    except ValueError as e:  # values fine one by one, not together (e.g. clusters vs items)
        given = ", ".join(f"{SYNTHETIC_KEYS[f]}={v}" for f, v in fields.items())
        raise ConfigError(f"synthetic_preset={preset} with {given}: {e}") from None
