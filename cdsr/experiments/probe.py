"""A trainer that records the alignment probe on the validation set after every epoch.

Why a subclass: the pipeline's `Trainer` probes alignment on the test set only, but the
alignment experiment asks how `|cos(X, X')|` moves over training. The model's GCA modules
already accumulate the probe whenever the model is evaluated (`models/gca_block.py`), and the
trainer validates once per epoch; so resetting the accumulators right before that validation
and reading them right after it (the trainer saves its checkpoint just then) yields the
epoch's validation probe at no extra cost. The entry goes into `history`, hence into the
checkpoint (a resumed run keeps it) and into `results.json`.

With `track_valid=True` the epoch's per-domain validation metrics are stored as well (one
extra, deterministic validation pass: the trainer keeps only the selection score per epoch).
`align_reg=L` (non-zero) sets the weight of the models' own alignment regulariser (training
minimises loss + L * mean |cos(X, X')|, `models/gca_block.py`) without writing it into the
run's config; a run whose config already sets `align_reg` is refused, so the weight is never
given twice.
"""

from __future__ import annotations

from typing import Any, Dict

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
            if self.model.config["align_reg"]:
                raise ValueError(f"align_reg given twice: {self.align_reg:g} by the experiment and "
                                 f"{self.model.config['align_reg']:g} in the run config")
            if not self.model.config["gca_positions"]:
                raise ValueError(f"align_reg={self.align_reg:g} regularises the GCA modules, "
                                 f"but gca_positions is empty")
            self.model.gca.align_reg = self.align_reg

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
