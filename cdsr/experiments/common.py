"""What the three experiments share: presets, run configs, metric look-ups, labels.

A preset fixes the models, datasets, seeds, epochs and config overrides an experiment uses
by default; every one of them can be overridden on the command line.

- `tiny`: the synthetic `tiny` data set, the small SASRec, 2 epochs, 20 evaluation
  negatives: seconds per run, for CI and for trying the commands out. Its numbers mean
  nothing about the paper.
- `cpu`: the two Amazon pairs here (abe, afk) with ABXI and one other paper backbone, 3 seeds,
  a short training budget (10 epochs, the models' own defaults otherwise).
- `paper`: the ABXI authors' training protocol (their code at commit 72e52c9, `main.py`,
  `trainer.py`, `models/data/dataloader.py`, `demo.sh`), for every backbone, 5 seeds:
  AdamW lr 1e-4, weight decay 2.0 (abe) / 3.0 (afk), batch 256; learning-rate warm-up per
  epoch from 1e-5 x lr over 10 epochs (`warmup_unit=epoch`); then lr x 0.3162 on the 31st
  validation epoch in a row without improvement (`lr_plateau_patience=30`, their
  ReduceLROnPlateau patience 30); early stop on the 62nd such epoch (`patience=62`: their
  counter stops when it exceeds es_p = 61); at most 500 epochs; no gradient clipping;
  LoRA ranks abe 64/64, afk 16 (domain) / 64 (invariant); selection on validation
  MRR_A + MRR_B; training negatives drawn per position (`neg_sampling=per_position`,
  `train_negatives=128`): 128 A + 128 B at every position, distinct, none of the user's
  training items, fresh each epoch. The schedule, cap, clipping and negatives apply to every
  backbone; the optimiser settings and LoRA ranks are ABXI's. LLM4CDSR keeps its authors'
  lr 1e-3, batch 128 and early-stop patience 20 (so its plateau decay never fires) and one
  negative per position (its binary loss), drawn the same way; CDSRNP (no public code)
  keeps its own optimiser defaults.

  Where runs under this preset still differ from the authors' code:
  - ABXI scores each position against its own 128 A + 128 B, as the authors' InfoNCE
    does; CDSRNP scores each position against its own n_neg of the target's domain (its
    loss shape, no public code to follow);
  - the authors validate nothing during warm-up and cannot select a warm-up epoch; here
    warm-up epochs are validated and may be selected, but count neither for early stopping
    nor for the plateau rule;
  - improvement is `>` on the validation score (theirs: `>=`, so a tie moves their best
    epoch later and resets their counters);
  - their training sample per user is its last 47 positions (len_max 50 - 3); here 50;
  - their B-domain candidate list also holds the last A item (an off-by-one in
    `idx_all_b`); here B negatives are B items only;
  - evaluation negatives are drawn once per split with a fixed seed (theirs: fresh per
    evaluation), the same 999 per user for every epoch and model;
  - seeds 0-4 (theirs: one seed, 3407, in demo.sh).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import models
from cdsr.config import ConfigError, make_config, valid_keys

DATA_LABELS = {"abe": "Beauty-Elec", "afk": "Food-Kitchen", "synthetic": "synthetic", "csv": "csv"}
DOMAINS = ("A", "B")

PAPER_BACKBONES = ("abxi", "llm4cdsr", "cdsrnp")

PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": {
        "models": ["sasrec"], "data": ["synthetic"], "seeds": [0, 1], "epochs": 2,
        "config": {"synthetic_preset": "tiny", "eval_negatives": 20, "eval_batch_size": 64,
                   "batch_size": 32, "hidden": 16, "patience": 5},
        # Three epochs: the per-epoch correlation needs three points.
        "alignment": {"hidden": [16, 32], "heads": [4, 8], "seeds": [0], "sample": 8, "track": 2, "epochs": 3},
        "scaling": {"widths": [8, 16, 32], "seeds": [0]},
    },
    "cpu": {
        "models": None, "data": ["abe", "afk"], "seeds": [0, 1, 2], "epochs": 10,
        "config": {},
        "alignment": {"hidden": [64, 128], "heads": [4, 8], "seeds": [0, 1], "sample": 12, "track": 2},
        "scaling": {"widths": [32, 64, 128, 256], "seeds": [0]},
    },
    "paper": {
        "models": None, "data": ["abe", "afk"], "seeds": [0, 1, 2, 3, 4], "epochs": 500,
        "config": {"warmup_unit": "epoch", "warmup_epochs": 10, "lr_plateau_patience": 30,
                   "lr_plateau_factor": 0.3162, "patience": 62, "grad_clip": 0.0,
                   "neg_sampling": "per_position", "train_negatives": 128, "early_stop_metric": "mrr"},
        "alignment": {"hidden": [64, 128], "heads": [4, 8], "seeds": [0, 1, 2, 3, 4], "sample": 0, "track": 3},
        "scaling": {"widths": [32, 64, 128, 256, 384], "seeds": [0, 1, 2]},
    },
}

# Per backbone and dataset, the `paper` preset's settings on top of its "config" (the ABXI
# authors' demo.sh; LLM4CDSR's published optimiser), applied where the run config has the key.
PAPER_SETTINGS: Dict[tuple, Dict[str, Any]] = {
    ("abxi", "abe"): {"lr": 1e-4, "weight_decay": 2.0, "batch_size": 256, "lora_rank_d": 64, "lora_rank_i": 64},
    ("abxi", "afk"): {"lr": 1e-4, "weight_decay": 3.0, "batch_size": 256, "lora_rank_d": 16, "lora_rank_i": 64},
    ("llm4cdsr", None): {"lr": 1e-3, "batch_size": 128, "patience": 20, "train_negatives": 1},
}


def preset(name: str) -> Dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def default_models(preset_name: str) -> List[str]:
    """The preset's backbones: `tiny` uses SASRec; `cpu` ABXI plus one other paper backbone;
    `paper` every paper backbone that is registered."""
    p = preset(preset_name)
    if p["models"] is not None:
        return list(p["models"])
    have = [m for m in PAPER_BACKBONES if m in models.MODEL_NAMES]
    if preset_name == "cpu":
        chosen = (["abxi"] if "abxi" in have else []) + [m for m in have if m != "abxi"][:1]
    else:
        chosen = have
    if not chosen:
        raise ConfigError(f"--preset {preset_name} needs the paper backbones ({', '.join(PAPER_BACKBONES)}), "
                          f"but only {', '.join(models.MODEL_NAMES)} are registered: pass --models")
    return chosen


def check_models(names: Iterable[str]) -> List[str]:
    out = list(names)
    for m in out:
        if m not in models.MODEL_NAMES:
            raise ConfigError(f"--models: unknown model {m!r}; valid models: {', '.join(models.MODEL_NAMES)}")
    return out


def gca_slots(model: str) -> tuple:
    return tuple(models.model_class(model).gca_slots)


def check_positions(model: str, positions: Sequence[int], what: str) -> List[int]:
    slots = gca_slots(model)
    bad = [p for p in positions if p not in slots]
    if bad:
        raise ConfigError(f"{what}: GCA positions {bad} are not offered by {model} (valid: {list(slots)})")
    return sorted(set(int(p) for p in positions))


def preset_settings(preset_name: str, model: str, data: str) -> Dict[str, Any]:
    """The config values preset `preset_name` gives a run of `model` on `data` (the preset's
    own, then PAPER_SETTINGS for `paper`), limited to the keys the model's runs have."""
    p = preset(preset_name)
    keys = valid_keys(model)
    out: Dict[str, Any] = {k: v for k, v in p["config"].items() if k in keys}
    if preset_name == "paper":
        for key in ((model, data), (model, None)):
            out.update({k: v for k, v in PAPER_SETTINGS.get(key, {}).items() if k in keys})
    return out


def run_config(model: str, data: str, seed: int, *, preset_name: str, epochs: int, device: str,
               threads: Optional[int], sets: Sequence[str], controlled: Dict[str, Any]) -> Dict[str, Any]:
    """preset overrides <- paper settings (paper preset) <- --set KEY=VALUE <- what the
    experiment itself varies (`controlled`; a --set of one of those keys is an error, since
    it would silently contradict the run's labels)."""
    keys = valid_keys(model)
    for item in sets:
        k = item.split("=", 1)[0].strip()
        if k in controlled or k in ("model", "data", "seed", "epochs", "device"):
            raise ConfigError(f"--set {k}=...: the experiment sets {k} itself; use its own option instead")
    overrides = preset_settings(preset_name, model, data)
    overrides.update({"data": data, "seed": int(seed), "epochs": int(epochs), "device": device,
                      "progress": "never"})
    if threads:
        overrides["threads"] = int(threads)
    unknown = [k for k in controlled if k not in keys]
    if unknown:
        raise ConfigError(f"model {model} has no config key {', '.join(unknown)} "
                          f"(valid keys: {', '.join(sorted(keys))})")
    cfg = make_config(model, overrides, sets)
    cfg.update(controlled)
    # Re-check with the experiment's values in place (e.g. heads must divide hidden).
    return make_config(model, {k: v for k, v in cfg.items() if k != "model"}, ())


def test_metric(results: Dict[str, Any], domain: str, name: str) -> float:
    try:
        return float(results["test"][domain][name])
    except (KeyError, TypeError):
        return float("nan")


def module_domain(module: str) -> Optional[str]:
    """The query domain of a GCA module from its name: `gca<i>_ab` is A attending to B (A's
    representation is the one GCA changes), `gca<i>_ba` the reverse. None if unknown."""
    tail = module.rsplit("_", 1)[-1].lower()
    if tail in ("ab", "a2b", "a"):
        return "A"
    if tail in ("ba", "b2a", "b"):
        return "B"
    return None


def module_slot(module: str) -> Optional[int]:
    head = module.split("_", 1)[0]
    digits = "".join(ch for ch in head if ch.isdigit())
    return int(digits) if digits else None


def variant_name(positions: Sequence[int]) -> str:
    return "GCA[" + ",".join(str(p) for p in positions) + "]" if positions else "bare"


def fmt_ms(stat: Dict[str, float], digits: int = 4) -> str:
    if not stat or stat.get("n", 0) == 0:
        return "-"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
