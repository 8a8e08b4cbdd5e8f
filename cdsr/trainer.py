"""Training loop: AdamW with linear warm-up, per-epoch validation, early stopping, the best
model kept, test at the best validation epoch, atomic per-epoch checkpoints, exact resume.

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
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

import models
from cdsr.batching import EvalSet, TrainSampler, build_eval_set
from cdsr.config import RESUMABLE_KEYS, ConfigError
from cdsr.dataset import CDSRDataset
from cdsr.distributed import DistContext
from cdsr.loaders import load_dataset
from cdsr.metrics import DEFAULT_KS, metric_names, ranking_metrics
from cdsr.progress import Progress, progress_enabled

log = logging.getLogger("cdsr.train")

DOMAINS = ("A", "B")
CHECKPOINT = "last.pt"
BEST = "best.pt"
RESULTS = "results.json"


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
        self.ctx = ctx or DistContext(device=torch.device(cfg["device"]))
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg["threads"]))
        self.dataset = dataset if dataset is not None else load_dataset(cfg)
        ds = self.dataset
        seed_everything(cfg["seed"])
        self.model = models.build_model(cfg["model"], ds.n_items_a, ds.n_items_b, cfg).to(self.ctx.device)
        self.n_params = models.n_trainable(self.model)
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.ctx.local_rank] if self.ctx.device.type == "cuda" else None
            self.train_model = DDP(self.model, device_ids=ids,
                                   find_unused_parameters=bool(cfg["find_unused_parameters"]))
        else:
            self.train_model = self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.sampler = TrainSampler(ds, cfg["max_len"], cfg["batch_size"], self.model.n_negatives, cfg["seed"],
                                    self.ctx.rank, self.ctx.world_size)
        self.steps_per_epoch = self.sampler.n_batches()
        warmup = int(round(cfg["warmup_epochs"] * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
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

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        return {
            "config": self.cfg, "model": self.cfg["model"], "epoch": self.epoch,
            "n_items_a": self.dataset.n_items_a, "n_items_b": self.dataset.n_items_b,
            "model_state": _cpu_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "best_score": self.best_score,
            "best_epoch": self.best_epoch, "best_valid": self.best_valid, "best_state": self.best_state,
            "bad_epochs": self.bad_epochs, "finished": self.finished, "history": self.history,
            "elapsed": self.elapsed,
        }

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_save(self.state(), self.out / CHECKPOINT)
        self.ctx.barrier()

    def load_checkpoint(self, path: Path) -> None:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        diff = sorted(k for k in set(ck["config"]) | set(self.cfg)
                      if k not in RESUMABLE_KEYS and ck["config"].get(k) != self.cfg.get(k))
        if diff:
            old_cfg = ck["config"]
            detail = ", ".join(f"{k} ({old_cfg.get(k)!r} vs {self.cfg.get(k)!r})" for k in diff)
            raise ConfigError(f"--resume: {path} was written with a different config for {detail}")
        self.model.load_state_dict(ck["model_state"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        for key in ("epoch", "best_score", "best_epoch", "best_valid", "best_state", "bad_epochs",
                    "finished", "history", "elapsed"):
            setattr(self, key, ck[key])
        # More epochs asked for than the finished run had: keep going unless early stopping ended it.
        if self.finished and self.bad_epochs < self.cfg["patience"] and self.epoch < self.cfg["epochs"]:
            self.finished = False
        log.info("resumed from %s after epoch %d (best epoch %d)", path, self.epoch, self.best_epoch)

    # ---- training ----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(_derived_seed(cfg["seed"], epoch, ctx.rank))
        self.model.train()
        bar = Progress(self.steps_per_epoch, f"epoch {epoch}/{cfg['epochs']}", enabled=self.show_progress)
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
            bar.update(1, loss=total / n, lr=self.scheduler.get_last_lr()[0])
        bar.close()
        return {"loss": total / max(1, n), "users_per_s": bar.rate * self.sampler.local_batch * ctx.world_size}

    def fit(self, resume: bool = False) -> Dict[str, Any]:
        cfg = self.cfg
        ck = self.out / CHECKPOINT
        if resume:
            if ck.is_file():
                self.load_checkpoint(ck)
            else:
                log.warning("--resume: no checkpoint at %s; starting from scratch", ck)
        elif ck.is_file() and self.ctx.is_main:
            log.warning("%s exists; starting a fresh run over it (pass --resume to continue it)", ck)
        if self.ctx.is_main:
            log.info("model %s: %s trainable parameters; data %s: %d users, %d/%d items; %d steps/epoch",
                     cfg["model"], f"{self.n_params:,}", self.dataset.name, self.dataset.n_users,
                     self.dataset.n_items_a, self.dataset.n_items_b, self.steps_per_epoch)
        metric = cfg["early_stop_metric"]
        while not self.finished and self.epoch < cfg["epochs"]:
            start = time.perf_counter()
            epoch = self.epoch + 1
            train_log = self.train_epoch(epoch)
            valid = evaluate(self.model, self.dataset, self.valid_set, cfg, self.ctx)
            score = selection_score(valid, metric)
            improved = score > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.best_valid = score, epoch, valid
                self.best_state = _cpu_state(self.model)
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
            seconds = time.perf_counter() - start
            self.elapsed += seconds
            self.epoch = epoch
            self.history.append({"epoch": epoch, "loss": train_log["loss"], "valid_score": score,
                                 "seconds": seconds})
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
