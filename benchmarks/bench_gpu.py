"""Images per second on a GPU: tunelab's loop against the bare loop, for each GPU option.

    python benchmarks/bench_gpu.py [--models resnet18,resnet50] [--image-size 224] [--batch-size 128]
                                   [--batches 24] [--epochs 3] [--compile] [--null-logger] [--budget 400] [--json FILE]

For each model and each option set (`trainer.precision` 32 / bf16-mixed / 16-mixed, with and
without `trainer.channels_last`, and `trainer.compile` with `--compile`) both sides train the same
freshly built model on the same in-memory random images (on the GPU, where tunelab puts small
in-memory sets) with SGD + cosine stepped per optimizer step, and validate on two batches each
epoch. tunelab's side is its real loop (`loop.fit`) with `lr` and `train/loss` logged every step to
MLflow when MLflow is installed (else to the null logger) and the progress bar on; the bare side is
the subject's loop with the same autocast, grad scaler, memory format and compilation written out by
hand. Epochs of both sides alternate after one warm-up epoch each (cuDNN's autotuning, compilation);
images/s is training images over the whole epoch time (its validation included), the ratio is the
median of adjacent-epoch ratios. `--budget` seconds stops starting new cases, so a lease is not
overrun; the cases done so far are printed and written to `--json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, say, started_logger  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))

CASES = [("32", False), ("32", True), ("bf16-mixed", False), ("bf16-mixed", True), ("16-mixed", True)]


def images(n: int, size: int, classes: int, device: torch.device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, 3, size, size, device=device, generator=gen)
    y = torch.randint(0, classes, (n,), device=device, generator=gen)
    return x, y


def tunelab_side(name: str, data, precision: str, channels_last: bool, compile_: bool, batch: int, total_steps: int, logger, device):
    from omegaconf import OmegaConf
    from torch.utils.data import TensorDataset

    from tunelab import data as data_lib
    from tunelab import freezing, loop, models
    from tunelab.callbacks.freezing import Freezing
    from tunelab.callbacks.metrics import MetricLogger
    from tunelab.callbacks.progress import ProgressBar
    from tunelab.schedules import build_schedule

    x, y, xv, yv = data
    torch.manual_seed(0)
    model = models.torchvision_model(name, 1000)
    plan = freezing.freeze(model, 0)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(freezing.param_groups(plan, 0.01), lr=0.01, momentum=0.9, weight_decay=5e-5)
    train = data_lib.make_loader(data_lib.to_device(TensorDataset(x, y), device), batch, True, 0, pin_memory=device.type == "cuda")
    val = data_lib.make_loader(data_lib.to_device(TensorDataset(xv, yv), device), batch, False, 0, pin_memory=device.type == "cuda")
    cfg = OmegaConf.create({"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": total_steps, "eta_min": 0.0, "interval": "step"})
    schedule = build_schedule(cfg, opt, len(train), math.ceil(total_steps / len(train)))
    trained = torch.compile(model) if compile_ else model
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    state = loop.LoopState()

    def epoch() -> float:
        started = time.perf_counter()
        options = loop.LoopOptions(max_epochs=state.epoch + 1, device=device, precision=precision, channels_last=channels_last)
        callbacks = [Freezing(model, plan, schedule), MetricLogger(logger), ProgressBar()]
        loop.fit(trained, train, val, opt, schedule, torch.nn.CrossEntropyLoss(), options, callbacks, state, scaler)
        return time.perf_counter() - started

    return epoch, state


def bare_side(name: str, data, precision: str, channels_last: bool, compile_: bool, batch: int, total_steps: int, device):
    import torchvision

    x, y, xv, yv = data
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    net = torch.compile(model) if compile_ else model
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    count = [0]

    def epoch() -> float:
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(count[0])).to(device)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(net(x[idx].contiguous(memory_format=memory_format)).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
        model.eval()
        correct = 0
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for i in range(0, len(yv), batch):
                correct += (net(xv[i : i + batch].contiguous(memory_format=memory_format)).argmax(1) == yv[i : i + batch]).sum().item()
        count[0] += 1
        return time.perf_counter() - started

    return epoch


def make_logger(tmp: Path):
    if importlib.util.find_spec("mlflow") is None:
        from tunelab.tracking import NullLogger

        return NullLogger(), "null logger (MLflow is not installed)"
    logger = started_logger(tmp / "gpu.db", "bench-gpu")
    return logger, f"MLflow (sqlite) through {type(logger).__name__}, lr and train/loss every step"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=24, help="training batches per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per side (after one warm-up)")
    parser.add_argument("--compile", action="store_true", help="also time trainer.compile=true (bf16-mixed, channels_last)")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds after which no new case starts")
    parser.add_argument("--json", default=None, help="write the results here as they come")
    parser.add_argument("--cases", default=",".join(f"{p}:{int(c)}" for p, c in CASES),
                        help="precision:channels_last pairs, e.g. 32:0,bf16-mixed:1")
    parser.add_argument("--null-logger", action="store_true", help="also time tunelab's loop with tracking off (MLflow's share)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    chosen = [(p, c == "1") for p, c in (case.split(":") for case in args.cases.split(","))]
    device = torch.device(args.device)
    if device.type == "cuda":
        assert torch.cuda.is_available(), "no CUDA GPU here; this benchmark needs one (use --device cpu to try it out)"
        torch.backends.cudnn.benchmark = True
        say(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    started = time.perf_counter()
    cases = [(m, p, c, False) for m in args.models.split(",") for p, c in chosen]
    if args.compile:
        cases += [(m, "bf16-mixed", True, True) for m in args.models.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        logger, logger_name = make_logger(Path(tmp))
        say(f"tunelab side logs to: {logger_name}")
        n = args.batch_size * args.batches
        total_steps = (args.epochs + 1) * args.batches
        for name, precision, channels_last, compile_ in cases:
            if time.perf_counter() - started > args.budget:
                say(f"budget of {args.budget:.0f} s spent: skipped {name} {precision} channels_last={channels_last} compile={compile_}")
                continue
            data = (*images(n, args.image_size, 1000, device, 1), *images(2 * args.batch_size, args.image_size, 1000, device, 2))
            a, state = tunelab_side(name, data, precision, channels_last, compile_, args.batch_size, total_steps, logger, device)
            b = bare_side(name, data, precision, channels_last, compile_, args.batch_size, total_steps, device)
            sides = [a, b]
            if args.null_logger:
                from tunelab.tracking import NullLogger

                sides.append(tunelab_side(name, data, precision, channels_last, compile_, args.batch_size, total_steps, NullLogger(), device)[0])
            warm = [side() for side in sides]
            times: list[list[float]] = [[] for _ in sides]
            for _ in range(args.epochs):  # the sides alternate, so the machine's drift cancels
                for side, t in zip(sides, times):
                    t.append(side())
            loss = state.history.epochs[-1]["train/loss"]
            row = {
                "model": name, "precision": precision, "channels_last": channels_last, "compile": compile_,
                "tunelab_img_s": n / statistics.median(times[0]), "bare_img_s": n / statistics.median(times[1]),
                "ratio": statistics.median(x / y for x, y in zip(times[0], times[1])), "warmup_s": warm, "train_loss": loss,
                "max_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            }
            if args.null_logger:
                row["null_logger_ratio"] = statistics.median(x / y for x, y in zip(times[2], times[1]))
            results.append(row)
            extra = f"  tracking off {row['null_logger_ratio']:.3f}x" if args.null_logger else ""
            say(f"{name:9s} {precision:10s} channels_last={channels_last!s:5s} compile={compile_!s:5s}  tunelab {row['tunelab_img_s']:7.0f} img/s  "
                f"bare {row['bare_img_s']:7.0f} img/s  ratio {row['ratio']:.3f}x{extra}  loss {loss:.3f}  warm-up {warm[0]:.1f}/{warm[1]:.1f} s")
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
            del data
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        logger.finish("FINISHED")
    say()
    off = " tracking off / bare |" if args.null_logger else ""
    say(f"| model | precision | channels_last | compile | tunelab img/s | bare loop img/s | epoch time ratio |{off}")
    say("|---|---|---|---|---|---|---|" + ("---|" if args.null_logger else ""))
    for r in results:
        off = f" {r['null_logger_ratio']:.3f}x |" if args.null_logger else ""
        say(f"| {r['model']} | {r['precision']} | {r['channels_last']} | {r['compile']} | {r['tunelab_img_s']:.0f} | {r['bare_img_s']:.0f} | {r['ratio']:.3f}x |{off}")


if __name__ == "__main__":
    main()
