"""A trainer that records the alignment probe on the validation set after every epoch.

Why a subclass: the pipeline's `Trainer` probes alignment on the test set only, but the
alignment experiment asks how `|cos(X, X')|` moves over training. The model's GCA modules
already accumulate the probe whenever the model is evaluated (`record_alignment`), and the
trainer validates once per epoch; so resetting the accumulators right before that validation
and reading them right after it (the trainer saves its checkpoint just then) yields the
epoch's validation probe at no extra cost. The entry goes into `history`, hence into the
checkpoint (a resumed run keeps it) and into `results.json`.

With `track_valid=True` the epoch's per-domain validation metrics are stored as well (one
extra, deterministic validation pass: the trainer keeps only the selection score per epoch).
With `align_reg=L` (non-zero) training minimises loss + L * |cos(X, X')| (`align_reg.py`).
"""

from __future__ import annotations

from typing import Any, Dict

from cdsr.experiments.align_reg import RegularisedModel
from cdsr.trainer import Trainer, evaluate, gathered_alignment


class ProbedTrainer(Trainer):
    def __init__(self, cfg: Dict[str, Any], out_dir, track_valid: bool = False, align_reg: float = 0.0,
                 **kwargs):
        # (The trainer builds the model through `build_model_for_data`, which also prepares
        # models with data-derived inputs such as LLM4CDSR's frozen tables.)
        super().__init__(cfg, out_dir, **kwargs)
        self.track_valid = bool(track_valid)
        self.align_reg = float(align_reg)
        if self.align_reg:
            if self.ctx.enabled:
                raise ValueError("align_reg is not supported in a distributed run")
            # The trainer calls train_model for the loss and steps the optimiser over
            # self.model's parameters: the wrapper only adds the term.
            self.train_model = RegularisedModel(self.model, self.align_reg)

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        logs = super().train_epoch(epoch)
        # The validation pass comes next: from here on the accumulators hold only its probe
        # (some models may also record while training; that must not leak into it).
        self.model.reset_alignment()
        return logs

    def save_checkpoint(self) -> None:
        # Called right after each epoch's validation (and once more at the very end, when the
        # last entry is already complete: the guard keeps that call from probing again).
        if self.history and "alignment" not in self.history[-1]:
            entry = self.history[-1]
            entry["alignment"] = gathered_alignment(self.model, self.ctx)
            if self.track_valid:
                self.model.reset_alignment()
                entry["valid"] = evaluate(self.model, self.dataset, self.valid_set, self.cfg, self.ctx)
        super().save_checkpoint()
