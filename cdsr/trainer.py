"""Training loop: AdamW with linear warm-up, per-epoch validation, plateau learning-rate decay,
early stopping, the best model kept, test at the best validation epoch, atomic per-epoch
checkpoints, exact resume.

Learning rate of optimiser step n (0-based) = lr x warm-up(n) x plateau scale. warm-up(n):
`warmup_unit=step` rises linearly every step to 1 after warmup_epochs epochs; `epoch` holds
1e-5 + (1 - 1e-5) x min(e, W) / W through epoch e + 1 (e = n // steps per epoch, W =
warmup_epochs), the ABXI authors' per-epoch LinearLR. Plateau scale: x lr_plateau_factor
when lr_plateau_patience + 1 validation epochs in a row did not improve (then the count
restarts); warm-up epochs of `warmup_unit=epoch` count neither for it nor for early stopping.

Why resume is exact: everything random inside epoch e (user order, negatives, dropout) is
seeded from (seed, e, rank) at the start of the epoch, and the checkpoint written after each
epoch holds the model, optimizer, scheduler and early-stopping state. A run killed mid-epoch
restarts that epoch from the last checkpoint and replays it bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

import models
from cdsr.batching import EvalSet, TrainSampler, build_eval_set
from cdsr.config import RESUMABLE_KEYS, ConfigError, comparable, resolve_threads
from cdsr.dataset import CDSRDataset, DataError
from cdsr.distributed import DistContext, resolve_device
from cdsr.loaders import load_dataset
from cdsr.metrics import DEFAULT_KS, metric_names, ranking_metrics
from cdsr.progress import progress_bar, progress_enabled

log = logging.getLogger("cdsr.train")

DOMAINS = ("A", "B")
CHECKPOINT = "last.pt"
BEST = "best.pt"
RESULTS = "results.json"
LOG = "train.log"


KILL_AT_EPOCH = "CDSR_KILL_AT_EPOCH"
KILLED_MARKER = "killed.txt"


def _fault_injection(out: Path, epoch: int) -> None:
    """$CDSR_KILL_AT_EPOCH=E: SIGKILL this process right after epoch E's checkpoint, once per
    run folder (a marker file remembers it): a lost node, for testing that runs resume."""
    if os.environ.get(KILL_AT_EPOCH) != str(epoch) or (out / KILLED_MARKER).exists():
        return
    (out / KILLED_MARKER).write_text(f"killed after epoch {epoch} by ${KILL_AT_EPOCH}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _cpu_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _check_gca_backend(cfg: Dict[str, Any], device: torch.device) -> None:
    """A forced GCA backend (gca_backend or $GCA_BACKEND) that cannot run here is a usage error
    now, not a failure at the first training step."""
    if not cfg.get("gca_positions"):
        return
    name, where = cfg.get("gca_backend", "auto"), "gca_backend"
    if name == "auto":
        name, where = os.environ.get("GCA_BACKEND") or "auto", "$GCA_BACKEND"
    if name == "auto":
        return
    try:
        from gca_kernels.backends import BackendUnavailableError, resolve
    except ImportError:  # an older gca_kernels: let the first call decide
        return
    try:
        resolve(name, device, torch.float32)
    except (BackendUnavailableError, ValueError) as e:
        raise ConfigError(f"{where}={name}: {str(e).splitlines()[0]}") from None


def build_model_for_data(cfg: Dict[str, Any], dataset: CDSRDataset, device: torch.device) -> models.Recommender:
    """The model a run config names, built for `dataset` and ready to train or evaluate.

    The one place the pipeline builds a model (`cdsr train`, `cdsr evaluate`, the experiment
    runner, every torchrun rank): after construction it calls the model's `prepare_data`
    (models whose inputs derive from the data, e.g. LLM4CDSR's frozen item tables, which
    checkpoints do not hold), under a forked RNG so that a cached or freshly built table
    leaves the run's random stream the same. A model's own checks (bad sizes, unreadable
    `.npy` tables) become one-line ConfigError / DataError.
    """
    _check_gca_backend(cfg, device)
    try:
        model = models.build_model(cfg["model"], dataset.n_items_a, dataset.n_items_b, cfg)
        prepare = getattr(model, "prepare_data", None)
        if callable(prepare):
            with torch.random.fork_rng(devices=[]):
                prepare(dataset)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise DataError(f"{cfg['model']}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{cfg['model']}: {e}") from None
    return model.to(device)


def read_checkpoint(path: str | os.PathLike, what: str = "--checkpoint") -> Dict[str, Any]:
    """A run's checkpoint (best.pt / last.pt) as a dict, or a DataError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder; give a checkpoint file (best.pt or last.pt of a run)")
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever unpickling says, the file is not a checkpoint
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise DataError(f"{what} {path} is not a cdsr checkpoint (torch.load: {type(e).__name__}"
                        + (f": {reason}" if reason else "") + ")") from None
    if not isinstance(ck, dict) or not {"model_state", "config", "n_items_a", "n_items_b"} <= set(ck) \
            or not isinstance(ck["config"], dict) or "model" not in ck["config"]:
        raise DataError(f"{what} {path} is not a cdsr checkpoint (best.pt or last.pt of a run)")
    return ck


def _existing_config(out: Path) -> Optional[Dict[str, Any]]:
    """The config of the run already in `out` (results.json, else last.pt), or None."""
    res = out / RESULTS
    if res.is_file():
        try:
            cfg = json.loads(res.read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            cfg = None
        if isinstance(cfg, dict):
            return cfg
        raise DataError(f"{res} is not a results file of a run; remove it or give another --out")
    if (out / CHECKPOINT).is_file():
        return read_checkpoint(out / CHECKPOINT, what="run checkpoint")["config"]
    return None


def _config_diff(old: Dict[str, Any], new: Dict[str, Any], ignore) -> list:
    old, new = comparable(old), comparable(new)
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


def _check_resumable(old: Dict[str, Any], cfg: Dict[str, Any], path: Path) -> None:
    diff = _config_diff(old, cfg, RESUMABLE_KEYS)
    if diff:
        detail = ", ".join(f"{k} ({old.get(k)!r} vs {cfg.get(k)!r})" for k in diff)
        raise ConfigError(f"--resume: {path} was written with a different config for {detail}")


def check_run_dir(out: str | os.PathLike, cfg: Dict[str, Any], resume: bool) -> None:
    """Refuse to start a fresh run over a different one. A fresh run may replace a run of the
    same config (device, threads and paths aside); `resume` continues a run of the same
    config (its epochs may differ: more epochs continue it). Anything else is a ConfigError
    naming the differences."""
    out = Path(out)
    if resume and (out / CHECKPOINT).is_file():
        _check_resumable(read_checkpoint(out / CHECKPOINT, what="--resume: checkpoint")["config"], cfg,
                         out / CHECKPOINT)
        return
    old = _existing_config(out)
    if old is None:
        return
    ignore = RESUMABLE_KEYS - {"epochs"}
    diff = _config_diff(old, cfg, ignore)
    if not diff:
        return
    if diff == ["epochs"] and isinstance(old.get("epochs"), int) and old["epochs"] < cfg["epochs"]:
        raise ConfigError(f"{out} holds this run trained for {old['epochs']} epochs; pass --resume to continue "
                          f"it to {cfg['epochs']} epochs, or --out DIR to train a separate run")
    detail = ", ".join(f"{k} {old.get(k)!r} there vs {cfg.get(k)!r}" for k in diff[:3])
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    raise ConfigError(f"{out} holds a different run ({detail}{more}); give --out DIR for this one, "
                      f"or remove that folder")


@torch.no_grad()
def evaluate(model: models.Recommender, dataset: CDSRDataset, eval_set: EvalSet, cfg: Dict[str, Any],
             ctx: DistContext, ks=DEFAULT_KS) -> Dict[str, Dict[str, float]]:
    """Per-domain metrics of `model` on `eval_set`; ranks score disjoint shards, then gather."""
    was_training = model.training
    model.eval()
    shard = eval_set.shard(ctx.rank, ctx.world_size) if ctx.enabled else eval_set
    scores, domains = [], []
    for batch in shard.batches(dataset, cfg["max_len"], cfg["eval_batch_size"]):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        s = model.score(batch, batch["candidates"])
        scores.append(s.float().cpu())
        domains.append(batch["eval_domain"].cpu())
    n_cand = eval_set.candidates.shape[1]
    scores_t = torch.cat(scores) if scores else torch.zeros(0, n_cand)
    domains_t = torch.cat(domains) if domains else torch.zeros(0, dtype=torch.long)
    if ctx.enabled:
        parts = ctx.all_gather_object((scores_t, domains_t))
        scores_t = torch.cat([p[0] for p in parts])
        domains_t = torch.cat([p[1] for p in parts])
    model.train(was_training)
    out = {}
    for d, name in enumerate(DOMAINS):
        sel = domains_t == d
        out[name] = ranking_metrics(scores_t[sel], ks)
        out[name]["users"] = int(sel.sum())
    return out


def gathered_alignment(model: models.Recommender, ctx: DistContext) -> Dict[str, Dict[str, float]]:
    if not ctx.enabled:
        return model.alignment_stats()
    total: Dict[str, list] = {}
    for part in ctx.all_gather_object(model.alignment_counts()):
        for k, (sx, sy, n) in part.items():
            t = total.setdefault(k, [0.0, 0.0, 0])
            t[0] += sx
            t[1] += sy
            t[2] += n
    return {k: {"cos_x_xprime": s[0] / s[2], "cos_x_y": s[1] / s[2]} for k, s in sorted(total.items()) if s[2]}


def selection_score(valid: Dict[str, Dict[str, float]], metric: str) -> float:
    vals = [valid[d][metric] for d in DOMAINS if not math.isnan(valid[d][metric])]
    return float(sum(vals)) if vals else float("-inf")


class Trainer:
    def __init__(self, cfg: Dict[str, Any], out_dir: str | os.PathLike, dataset: Optional[CDSRDataset] = None,
                 ctx: Optional[DistContext] = None):
        self.cfg = dict(cfg)
        self.out = Path(out_dir)
        self.ctx = ctx or DistContext(device=resolve_device(cfg["device"]))
        self.threads = resolve_threads(cfg)
        torch.set_num_threads(self.threads)
        self.dataset = dataset if dataset is not None else load_dataset(cfg)
        ds = self.dataset
        seed_everything(cfg["seed"])
        self.model = build_model_for_data(cfg, ds, self.ctx.device)
        self.n_params = models.n_trainable(self.model)
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.ctx.local_rank] if self.ctx.device.type == "cuda" else None
            # Buffers are not broadcast at every step: the only ones (LLM4CDSR's frozen item
            # tables, 100 MB on abe) are built identically on every rank and never change.
            self.train_model = DDP(self.model, device_ids=ids, broadcast_buffers=False,
                                   find_unused_parameters=bool(cfg["find_unused_parameters"]))
        else:
            self.train_model = self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        try:
            self.sampler = TrainSampler(ds, cfg["max_len"], cfg["batch_size"], self.model.n_negatives, cfg["seed"],
                                        self.ctx.rank, self.ctx.world_size, neg_sampling=cfg.get("neg_sampling", "per_user"),
                                        per_position_k=int(cfg.get("train_negatives") or 0))
        except ValueError as e:
            if isinstance(e, DataError):
                raise
            raise ConfigError(str(e)) from None
        self.steps_per_epoch = self.sampler.n_batches()
        self.plateau_scale = 1.0  # product of the plateau decays so far
        self.plateau_bad = 0  # validation epochs without improvement since the last decay
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.valid_set = build_eval_set(ds, "valid", cfg["eval_negatives"], cfg["eval_seed"])
        self.show_progress = self.ctx.is_main and progress_enabled(cfg["progress"])
        # Early-stopping state (all of it goes into the checkpoint).
        self.epoch = 0
        self.best_score = float("-inf")
        self.best_epoch = 0
        self.best_valid: Optional[Dict] = None
        self.best_state: Optional[Dict[str, torch.Tensor]] = None
        self.bad_epochs = 0
        self.finished = False
        self.history: list = []
        self.elapsed = 0.0

    # ---- learning rate -----------------------------------------------------------------------
    def _warmup_factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.get("warmup_unit", "step") == "epoch":
            width = cfg["warmup_epochs"]
            if width <= 0:
                return 1.0
            start = 1e-5
            return start + (1.0 - start) * min(step // self.steps_per_epoch, width) / width
        warmup = int(round(cfg["warmup_epochs"] * self.steps_per_epoch))
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    def _lr_factor(self, step: int) -> float:
        return self._warmup_factor(step) * self.plateau_scale

    def in_warmup(self, epoch: int) -> bool:
        """Epoch `epoch` (1-based) trained under the per-epoch warm-up."""
        return self.cfg.get("warmup_unit", "step") == "epoch" and epoch <= self.cfg["warmup_epochs"]

    def _decay_on_plateau(self, improved: bool) -> bool:
        """Count a validation epoch for the plateau rule; True when it decayed the lr."""
        patience = int(self.cfg.get("lr_plateau_patience") or 0)
        if patience <= 0:
            return False
        self.plateau_bad = 0 if improved else self.plateau_bad + 1
        if self.plateau_bad <= patience:
            return False
        self.plateau_scale *= float(self.cfg["lr_plateau_factor"])
        self.plateau_bad = 0
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self._lr_factor(self.scheduler.last_epoch)
        return True

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        return {
            "config": self.cfg, "model": self.cfg["model"], "epoch": self.epoch,
            "n_items_a": self.dataset.n_items_a, "n_items_b": self.dataset.n_items_b,
            "model_state": _cpu_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "best_score": self.best_score,
            "best_epoch": self.best_epoch, "best_valid": self.best_valid, "best_state": self.best_state,
            "bad_epochs": self.bad_epochs, "finished": self.finished, "history": self.history,
            "elapsed": self.elapsed, "plateau": {"scale": self.plateau_scale, "bad": self.plateau_bad},
        }

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_save(self.state(), self.out / CHECKPOINT)
        self.ctx.barrier()

    def load_checkpoint(self, path: Path) -> None:
        ck = read_checkpoint(path, what="--resume: checkpoint")
        _check_resumable(ck["config"], self.cfg, path)
        self.model.load_state_dict(ck["model_state"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        for key in ("epoch", "best_score", "best_epoch", "best_valid", "best_state", "bad_epochs",
                    "finished", "history", "elapsed"):
            setattr(self, key, ck[key])
        plateau = ck.get("plateau") or {}
        self.plateau_scale = float(plateau.get("scale", 1.0))
        self.plateau_bad = int(plateau.get("bad", 0))
        # More epochs asked for than the finished run had: keep going unless early stopping ended it.
        if self.finished and self.bad_epochs < self.cfg["patience"] and self.epoch < self.cfg["epochs"]:
            self.finished = False
        log.info("resumed from %s after epoch %d (best epoch %d)", path, self.epoch, self.best_epoch)

    # ---- training ----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(_derived_seed(cfg["seed"], epoch, ctx.rank))
        self.model.train()
        bar = progress_bar(self.steps_per_epoch, f"epoch {epoch}/{cfg['epochs']}", enabled=self.show_progress)
        start = time.perf_counter()
        total, n = 0.0, 0
        for batch in self.sampler.epoch(epoch):
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            loss, _logs = self.train_model(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"])
            self.optimizer.step()
            self.scheduler.step()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"training loss became {lv} at epoch {epoch} step {n + 1}; "
                                         f"lower lr (now {cfg['lr']}) or check the data")
            total += lv
            n += 1
            bar.set_postfix(loss=total / n, lr=self.scheduler.get_last_lr()[0], refresh=False)
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - start
        steps_per_s = n / seconds if seconds > 0 else 0.0
        return {"loss": total / max(1, n), "users_per_s": steps_per_s * self.sampler.local_batch * ctx.world_size}

    def fit(self, resume: bool = False) -> Dict[str, Any]:
        cfg = self.cfg
        ck = self.out / CHECKPOINT
        if not (resume and ck.is_file()):  # (load_checkpoint checks a resumed run's config)
            check_run_dir(self.out, cfg, resume)
        if resume:
            if ck.is_file():
                self.load_checkpoint(ck)
            else:
                log.warning("--resume: no checkpoint at %s; starting from scratch", ck)
        elif ck.is_file() and self.ctx.is_main:
            log.warning("%s exists; starting a fresh run over it (pass --resume to continue it)", ck)
        if self.ctx.is_main:
            log.info("model %s: %s trainable parameters; data %s: %d users, %d/%d items; %d steps/epoch; "
                     "device %s%s", cfg["model"], f"{self.n_params:,}", self.dataset.name, self.dataset.n_users,
                     self.dataset.n_items_a, self.dataset.n_items_b, self.steps_per_epoch, self.ctx.device,
                     f", {self.threads} threads" if self.ctx.device.type == "cpu" else "")
        metric = cfg["early_stop_metric"]
        while not self.finished and self.epoch < cfg["epochs"]:
            start = time.perf_counter()
            epoch = self.epoch + 1
            lr_first = self.optimizer.param_groups[0]["lr"]  # (of the epoch's first step)
            train_log = self.train_epoch(epoch)
            valid = evaluate(self.model, self.dataset, self.valid_set, cfg, self.ctx)
            score = selection_score(valid, metric)
            improved = score > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.best_valid = score, epoch, valid
                self.best_state = _cpu_state(self.model)
                self.bad_epochs = 0
            elif not self.in_warmup(epoch):
                self.bad_epochs += 1
            decayed = not self.in_warmup(epoch) and self._decay_on_plateau(improved)
            if decayed and self.ctx.is_main:
                log.info("plateau: lr x %g after %d epochs without improvement (lr now %.3g)",
                         cfg["lr_plateau_factor"], cfg["lr_plateau_patience"] + 1, self.optimizer.param_groups[0]["lr"])
            seconds = time.perf_counter() - start
            self.elapsed += seconds
            self.epoch = epoch
            self.history.append({"epoch": epoch, "loss": train_log["loss"], "valid_score": score,
                                 "seconds": seconds, "lr": lr_first})
            if self.bad_epochs >= cfg["patience"]:
                self.finished = True
                if self.ctx.is_main:
                    log.info("early stop: no %s improvement for %d epochs", metric, self.bad_epochs)
            if self.ctx.is_main:
                log.info("epoch %d loss %.4f | valid %s A %.4f B %.4f ndcg@10 A %.4f B %.4f | %.1fs, %.0f users/s%s",
                         epoch, train_log["loss"], metric, valid["A"][metric], valid["B"][metric],
                         valid["A"]["ndcg@10"], valid["B"]["ndcg@10"], seconds, train_log["users_per_s"],
                         "  *best" if improved else "")
            self.save_checkpoint()
            if self.ctx.is_main:
                _fault_injection(self.out, epoch)
        if not self.finished:
            self.finished = True
            self.save_checkpoint()
        return self.test()

    def test(self) -> Dict[str, Any]:
        start = time.perf_counter()
        if self.best_state is None:
            raise RuntimeError("no trained epoch: nothing to test (epochs must be >= 1)")
        self.model.load_state_dict(self.best_state)
        test_set = build_eval_set(self.dataset, "test", self.cfg["eval_negatives"], self.cfg["eval_seed"])
        self.model.reset_alignment()
        test = evaluate(self.model, self.dataset, test_set, self.cfg, self.ctx)
        alignment = gathered_alignment(self.model, self.ctx)
        self.elapsed += time.perf_counter() - start
        results = {
            "config": self.cfg,
            "seed": self.cfg["seed"],
            "model": self.cfg["model"],
            "data": self.dataset.name,
            "dataset": self.dataset.stats(),
            "n_params": self.n_params,
            # a parameter-matched baseline (scale_to_match) also records the count it matches
            "n_params_target": getattr(self.model, "n_params_target", self.n_params),
            "best_epoch": self.best_epoch,
            "epochs_run": self.epoch,
            # early stopping ended the run (not the epoch cap)
            "early_stopped": self.bad_epochs >= self.cfg["patience"],
            "valid": self.best_valid,
            "test": test,
            "alignment": alignment,
            "wall_time_s": self.elapsed,
            "world_size": self.ctx.world_size,
            "out_dir": str(self.out),
            "history": self.history,
        }
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_save({"config": self.cfg, "model": self.cfg["model"], "epoch": self.best_epoch,
                         "n_items_a": self.dataset.n_items_a, "n_items_b": self.dataset.n_items_b,
                         "model_state": self.best_state}, self.out / BEST)
            atomic_write_json(results, self.out / RESULTS)
        self.ctx.barrier()
        return results


def format_table(results: Dict[str, Any], ks=DEFAULT_KS) -> str:
    """Per-domain metric table of a results dict (valid at the best epoch, and test)."""
    names = metric_names(ks)
    head = f"{'split':<6} {'dom':<3} {'users':>6} " + " ".join(f"{n:>8}" for n in names)
    lines = [head, "-" * len(head)]
    for split in ("valid", "test"):
        block = results.get(split) or {}
        for d in DOMAINS:
            m = block.get(d)
            if not m:
                continue
            lines.append(f"{split:<6} {d:<3} {m.get('users', 0):>6} " + " ".join(f"{m[n]:>8.4f}" for n in names))
    return "\n".join(lines)
