"""Wall time of what a training run spends its time on: one optimiser step of a backbone on
real data under an experiment preset, and one validation pass.

    python -m benchmarks.train_step --models abxi llm4cdsr cdsrnp --data abe --preset paper

Per model: the step time (mean and min over --steps steps after one warm-up step; the
batches come from the run's own sampler, so padding, negatives and batch size are what a
run of that preset sees), the sampler's time per batch, the validation pass, and the epoch
they add up to. `--threads` fixes torch's threads (default 1, as the experiment runner's
workers use). The figures depend on what else the machine runs: say so when quoting them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import List, Optional

import torch


def measure(model: str, data: str, preset: str, steps: int, threads: int, validate: bool, sets: List[str]) -> dict:
    from cdsr.experiments.common import run_config
    from cdsr.trainer import Trainer, evaluate

    cfg = dict(run_config(model, data, 0, preset_name=preset, epochs=1, device="cpu", threads=threads,
                          sets=sets, controlled={}))
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(cfg, out)
        tr.model.train()
        t0 = time.perf_counter()
        it = tr.sampler.epoch(1)
        batches = [next(it) for _ in range(min(steps + 1, tr.steps_per_epoch))]
        sample_s = (time.perf_counter() - t0) / len(batches)

        def step(batch):
            loss, _ = tr.train_model(batch)
            tr.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"]:  # as Trainer.train_epoch does
                torch.nn.utils.clip_grad_norm_(tr.model.parameters(), cfg["grad_clip"])
            tr.optimizer.step()

        step(batches[0])
        times = []
        for batch in batches[1:]:
            t = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - t)
        valid_s = float("nan")
        if validate:
            t = time.perf_counter()
            evaluate(tr.model, tr.dataset, tr.valid_set, cfg, tr.ctx)
            valid_s = time.perf_counter() - t
        step_s = statistics.mean(times)
        return {"model": model, "data": data, "preset": preset, "threads": threads, "steps": len(times),
                "step_s": step_s, "step_min_s": min(times), "sample_s": sample_s,
                "steps_per_epoch": tr.steps_per_epoch, "valid_s": valid_s,
                "epoch_s": tr.steps_per_epoch * (step_s + sample_s) + (valid_s if validate else 0.0)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["abxi", "llm4cdsr", "cdsrnp"])
    p.add_argument("--data", nargs="+", default=["abe"])
    p.add_argument("--preset", default="paper")
    p.add_argument("--steps", type=int, default=4, help="timed steps per model (default 4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-validate", dest="validate", action="store_false", help="skip the validation pass")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), preset {args.preset}")
    print("| model | data | step s (mean / min) | sampler s/batch | steps/epoch | validation s | epoch s |")
    print("|---|---|---|---|---|---|---|")
    for data in args.data:
        for model in args.models:
            r = measure(model, data, args.preset, args.steps, args.threads, args.validate, args.set)
            print(f"| {model} | {data} | {r['step_s']:.3f} / {r['step_min_s']:.3f} | {r['sample_s']:.3f} | "
                  f"{r['steps_per_epoch']} | {r['valid_s']:.3g} | {r['epoch_s']:.3g} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
