"""The ViT-B/16 W4A4 run of configs/vitb_w4a4.py on random weights, timed stage by stage.

  python benchmarks/pipeline.py [--images 32] [--steps 100] [--recon_iters 100] \
      [--eval_images 5000] [--data_dir DIR] [--peak_tflops T] [--arch SPEC]

The whole pipeline runs through `spdfq_jax.main.run`, as `python -m spdfq_jax.main` would
run it: a random-weight ViT-B/16 written as a checkpoint and loaded from it, FP evaluation,
SPDFQ synthesis (APA + MSR + SL), calibration, reparameterisation, block-wise
reconstruction, quantized evaluation, export. The evaluation data are `--eval_images`
JPEGs of random content at ImageNet-like sizes (300-500 px a side) in the image-folder
layout of spdfq_jax/data/imagenet.py (`val/<wnid>/*.JPEG`, round robin over the 1000
classes), so decoding and resizing are real; `--data_dir` keeps them for the next run.

Printed: seconds per stage (from the run's own report; calibration and reconstruction
from `quant.quantize`'s timings), the synthesis step's median (from `synth.generate`'s
per-step callback at each read of the device, every synth.log_every steps: the time between
reads over the steps between; the first read, after the compile, apart), the reconstruction's first
iterations (one compile per unit) apart from the later ones, evaluation images/s (overall,
and after the first batch, which compiles), the synthesis step's FLOPs (XLA's cost
analysis of the compiled step) and achieved FLOP/s as a share of the device's dense peak
(a table of known devices at the precision JAX uses for float32 matmuls; `--peak_tflops`
for others), and the paper's full setting (32 images, 1000 steps, 100 reconstruction
iterations per unit, 50,000 evaluation images) extrapolated from these figures.
The defaults fit in about 5 minutes on one H100-class GPU, compilation included.
`--arch` swaps in another architecture (a spec as in spdfq_jax/models/arch.py, e.g.
'vit_base_patch16_224:depth=2' for a quick look) under the same config.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib
import os
import statistics
import sys
import tempfile
import time
from typing import Iterator, Optional
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import step_util  # noqa: E402
from configs import vitb_w4a4  # noqa: E402
from spdfq_jax import fp_model, pipeline  # noqa: E402
from spdfq_jax import main as spdfq_main  # noqa: E402
from spdfq_jax.data import imagenet  # noqa: E402
from spdfq_jax.models import arch, native, zoo  # noqa: E402

MODEL = "vit_base_patch16_224"
PAPER = dict(images=32, steps=1000, recon_iters=100, eval_images=imagenet.VAL_SIZE)

# Dense peak TFLOP/s per chip (vendor data sheets; sparsity excluded), by matmul precision.
# Matched in order against the lower-cased `device_kind`.
PEAK_TFLOPS = (
    ("h200", "NVIDIA H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),
    ("h100 pcie", "NVIDIA H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("h100", "NVIDIA H100 SXM", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),
    ("a100", "NVIDIA A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    ("tpu v5 lite", "TPU v5e", {"bf16": 197.0}),
    ("tpu v5e", "TPU v5e", {"bf16": 197.0}),
    ("tpu v5", "TPU v5p", {"bf16": 459.0}),
    ("tpu v4", "TPU v4", {"bf16": 275.0}),
)


# ----------------------------------------------------------------------------- inputs


def write_image_folder(root: str, count: int, seed: int = 0, workers: int = 8) -> int:
  """`count` random-content JPEGs, 300-500 px a side, as root/val/<wnid>/*.JPEG, image i in
  class i mod 1000; files already there are kept. Returns how many were written."""
  wnids = imagenet.wnids()

  def write(i: int) -> int:
    path = os.path.join(root, "val", wnids[i % len(wnids)], f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    if os.path.exists(path):
      return 0
    rng = np.random.default_rng([seed, i])
    w, h = (int(v) for v in rng.integers(300, 501, size=2))
    # Smooth colour fields plus grain: JPEG sizes near ImageNet's, unlike pure noise.
    base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC)
    pixels = np.asarray(base, np.float32) + rng.normal(0, 12, (h, w, 3))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=90)
    os.replace(tmp, path)
    return 1

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return sum(pool.map(write, range(count)))


def random_checkpoint(path: str, spec: str, seed: int = 0) -> None:
  """A randomly initialised model of architecture `spec` in our checkpoint format, with
  ViT-B/16's preprocessing at the model's input size."""
  family, kwargs = arch.parse(spec)
  module = (zoo.custom_swin if family == "swin" else zoo.custom_vit)(**kwargs)
  size = module.img_size
  params = jax.jit(module.init)(jax.random.PRNGKey(seed), np.zeros((1, size, size, 3), np.float32))
  pre = dataclasses.replace(zoo.entry(MODEL).preprocessing, input_size=size)
  native.save(path, module, jax.device_get(params["params"]), pre)


def run_config(checkpoint: str, data_dir: str, opts: argparse.Namespace):
  """configs/vitb_w4a4.py, pointed at the random checkpoint and the image folder, sized down."""
  c = vitb_w4a4.get_config()
  c.title = f"{opts.arch} (random weights) SPDFQ W4A4: pipeline benchmark"
  c.model.checkpoint, c.model.arch = checkpoint, opts.arch
  c.data.dir, c.data.source, c.data.workers = data_dir, "folder", opts.workers
  c.eval.limit, c.eval.batch_size = opts.eval_images, opts.eval_batch
  c.num_images = opts.images
  c.synth.iterations, c.synth.warmup = opts.steps, max(1, opts.steps // 10)
  c.quant.recon.iters = opts.recon_iters
  return c


# ----------------------------------------------------------------------------- timing hooks


@dataclasses.dataclass
class Ticks:
  """Wall-clock marks taken inside the run without changing what it does."""
  synth_start: float = 0.0
  synth_steps: list = dataclasses.field(default_factory=list)  # (step, time) per callback
  evals: list = dataclasses.field(default_factory=list)  # per evaluation: [(end of batch, n)]
  recon_units: list = dataclasses.field(default_factory=list)  # per unit: iteration starts + end

  def step_seconds(self) -> tuple[float, int, list[float]]:
    """(seconds to the first read of the device, steps it covered (the compile among them),
    seconds per step between each later read and the one before).

    The loop reads the device every `log_every` steps and then calls back for each of those
    steps at once, so only the times of those reads (the last callback of each burst)
    mark finished steps; the callbacks between are the host catching up."""
    reads = [(step, t) for i, (step, t) in enumerate(self.synth_steps)
             if i + 1 == len(self.synth_steps) or self.synth_steps[i + 1][1] - t > 1e-3]
    (s0, t0), later = reads[0], []
    for (sa, ta), (sb, tb) in zip(reads, reads[1:]):
      later.append((tb - ta) / (sb - sa))
    return t0 - self.synth_start, s0 + 1, later


def timed_stages(ticks: Ticks) -> spdfq_main.Stages:
  """main's stages, with synthesis reporting the end of every step."""
  stages = spdfq_main.default_stages()
  generate = stages.generate

  def timed_generate(*args, **kwargs):
    ticks.synth_start = time.perf_counter()
    return generate(*args, callback=lambda step, terms: ticks.synth_steps.append(
        (step, time.perf_counter())), **kwargs)

  return dataclasses.replace(stages, generate=timed_generate)


@contextlib.contextmanager
def timed_eval_batches(ticks: Ticks) -> Iterator[None]:
  """`imagenet.batches` marking when the evaluation is done with each batch (evaluate reads
  each batch's counts back before it asks for the next)."""
  inner = imagenet.batches

  def batches(*args, **kwargs):
    marks: list[tuple[float, int]] = []
    ticks.evals.append(marks)
    for images, labels in inner(*args, **kwargs):
      yield images, labels
      marks.append((time.perf_counter(), len(images)))

  with mock.patch.object(imagenet, "batches", batches):
    yield


@contextlib.contextmanager
def timed_recon_iterations(ticks: Ticks) -> Iterator[None]:
  """The reconstruction's progress bar, marking the start of every iteration and the end
  of each unit's loop (which reads the last loss back, so it waits for the device)."""
  module = importlib.import_module("spdfq_jax.quant.reconstruct")
  inner = module.tqdm

  class Bar:
    def __init__(self, iterable, *args, **kwargs):
      self.bar = inner(iterable, *args, **kwargs)
      self.marks: list[float] = []
      ticks.recon_units.append(self.marks)

    def __iter__(self):
      for item in self.bar:
        self.marks.append(time.perf_counter())
        yield item
      self.marks.append(time.perf_counter())

    def __getattr__(self, name):
      return getattr(self.bar, name)

  with mock.patch.object(module, "tqdm", Bar):
    yield


def recon_later_iterations(ticks: Ticks) -> tuple[float, Optional[float]]:
  """(seconds of all iterations after each unit's first, seconds per such iteration; None
  with one iteration per unit). The rest of the stage is per unit: compiles (in the first
  iteration), the units' inputs and outputs, checkpoints."""
  later = [np.diff(m)[1:] for m in ticks.recon_units]
  n = sum(len(d) for d in later)
  total = sum(float(d.sum()) for d in later)
  return total, (total / n if n else None)


def steady_rate(marks: list[tuple[float, int]]) -> Optional[float]:
  """Images/s after the first batch (which compiles); None with a single batch."""
  if len(marks) < 2:
    return None
  return sum(n for _, n in marks[1:]) / (marks[-1][0] - marks[0][0])


# ----------------------------------------------------------------------------- FLOPs


def step_flops(config, module, params) -> tuple[float, float]:
  """(FLOPs of one synthesis step of this run's config, seconds the analysis took): XLA's
  cost analysis of the compiled step."""
  t = time.perf_counter()
  stages = spdfq_main.default_stages()
  pre = fp_model.preprocessing_of(config, module, params)
  scfg, _ = pipeline.synth_plan(stages, module, "spdfq", config, pre)
  step, args = step_util.synth_step(module, params, scfg, donate=False)
  cost = step.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]), time.perf_counter() - t


def matmul_precision(platform: str) -> Optional[str]:
  """The arithmetic of float32 matmuls under JAX's precision setting: TF32 on NVIDIA GPUs
  and one bf16 pass on TPUs by default, true fp32 at 'highest'; None when not known."""
  setting = str(jax.config.jax_default_matmul_precision or "default").lower()
  if platform == "cpu" or setting in ("highest", "float32", "f32_f32_f32"):
    return "fp32"
  if setting in ("default", "fastest", "bfloat16", "bf16_bf16_f32"):
    return {"gpu": "tf32", "tpu": "bf16"}.get(platform)
  if setting in ("high", "tensorfloat32", "tf32_tf32_f32") and platform == "gpu":
    return "tf32"
  return None


def device_peak(device_kind: str, precision: Optional[str]) -> Optional[tuple[str, float]]:
  """(device name, dense peak TFLOP/s at `precision`) from the table, or None."""
  kind = device_kind.lower()
  for pattern, name, peaks in PEAK_TFLOPS:
    if pattern in kind:
      return (name, peaks[precision]) if precision in peaks else None
  return None


# ----------------------------------------------------------------------------- report


def report(opts, out: dict, ticks: Ticks, build_s: float, flops: float, flops_s: float,
           wrote: int, write_s: float) -> None:
  row = out["rows"][0]
  t = row["timings"]
  first, first_steps, steps = ticks.step_seconds()
  median = statistics.median(steps) if steps else None
  fp_marks, q_marks = ticks.evals
  recon_later, recon_iter = recon_later_iterations(ticks)
  recon_fixed = t["reconstruct"] - recon_later
  units = len(ticks.recon_units)
  fp_rate, q_rate = steady_rate(fp_marks), steady_rate(q_marks)
  n_eval = row["eval_count"]
  dev = jax.devices()[0]
  print(f"\nMachine: {out['machine'].get('device_kind', dev.device_kind)} x "
        f"{jax.device_count()} ({dev.platform}), {os.cpu_count()} CPU cores, jax "
        f"{jax.__version__}, {datetime.date.today().isoformat()}")
  print(f"Run: {opts.arch} random weights, SPDFQ W4A4, {opts.images} images, {opts.steps} "
        f"synthesis steps, {opts.recon_iters} reconstruction iterations per unit, "
        f"{n_eval} evaluation images at batch {opts.eval_batch} "
        f"({wrote} JPEGs written in {write_s:.1f} s before the run)\n")

  def rate(seconds: float, steady: Optional[float]) -> str:
    s = f"{n_eval / seconds:.1f} img/s overall"
    return s + (f", {steady:.1f} img/s after the first batch" if steady else
                ", one batch only")

  rows = [
      ("model build (random init + save)", build_s, ""),
      ("load checkpoint", out["load_seconds"], ""),
      ("FP evaluation", out["fp_eval_seconds"], rate(out["fp_eval_seconds"], fp_rate)),
      ("synthesis, compile included", t["synthesize"],
       f"first {first_steps} steps {first:.2f} s (compile included)"
       + (f", median step {median:.3f} s over {len(steps)} later reads" if median else
          ", no later read: more --steps than synth.log_every")),
      ("calibration", t["calibrate"], ""),
      ("reparameterisation", t.get("reparameterize", 0.0), ""),
      ("reconstruction", t["reconstruct"],
       f"{units} units x {opts.recon_iters} iterations: {recon_fixed:.2f} s per-unit work "
       "(compiles, unit inputs, checkpoints)" + (f", then {1000 * recon_iter:.1f} ms per "
                                                 "iteration" if recon_iter else "")),
      ("quantized evaluation", t["evaluate"], rate(t["evaluate"], q_rate)),
      ("export", t.get("export", 0.0), ""),
      ("total (main.run)", out["total_seconds"], ""),
  ]
  print("| stage | seconds | |\n|---|---|---|")
  for name, sec, note in rows:
    print(f"| {name} | {sec:.2f} | {note} |")

  print(f"\nSynthesis step: {flops / 1e9:.4g} GFLOP (XLA cost analysis of the compiled step; "
        f"the analysis took {flops_s:.1f} s, outside the run)")
  if median:
    achieved = flops / median / 1e12
    precision = matmul_precision(dev.platform)
    if opts.peak_tflops:
      peak = ("--peak_tflops", opts.peak_tflops)
    else:
      peak = device_peak(dev.device_kind, precision)
    line = f"achieved {achieved:.3g} TFLOP/s"
    if jax.device_count() > 1:
      line += "; share of peak not given: the table is per chip and this run used several"
    elif peak:
      line += (f" = {100 * achieved / peak[1]:.1f}% of the {peak[0]} dense peak "
               f"({peak[1]:g} TFLOP/s, {precision or 'as given'})")
    else:
      line += (f"; peak unknown for {dev.device_kind!r} ({precision or 'unknown precision'});"
               " pass --peak_tflops")
    print(line)

  # The paper's setting, extrapolated: fixed costs (compiles, the first step, per-unit work) as
  # measured, steps / iterations / batches at their measured rate, per-image costs linear
  # in the number of images.
  scale = PAPER["images"] / opts.images
  if median and recon_iter and fp_rate and q_rate:
    synth = first + (PAPER["steps"] - first_steps) * median * scale
    recon = recon_fixed + units * (PAPER["recon_iters"] - 1) * recon_iter * scale
    calib = (t["calibrate"] + t.get("reparameterize", 0.0)) * scale
    evals = PAPER["eval_images"] / fp_rate + PAPER["eval_images"] / q_rate
    total = out["load_seconds"] + synth + calib + recon + evals + t.get("export", 0.0)
    print("\nPaper setting (32 images, 1000 steps with MSR, 100 reconstruction iterations per "
          "unit, 50,000 evaluation images), extrapolated from this run"
          + (f" (per-image costs scaled by 32/{opts.images})" if scale != 1 else "")
          + f": synthesis {synth / 60:.1f} min, calibration {calib:.0f} s, reconstruction "
          f"{recon / 60:.1f} min, FP + quantized evaluation {evals / 60:.1f} min; total "
          f"{total / 60:.1f} min")
  else:
    print("\nPaper setting: not extrapolated (needs >= 2 synthesis steps, >= 2 reconstruction "
          "iterations and >= 2 batches per evaluation)")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--arch", default=MODEL, help="architecture spec (default: ViT-B/16)")
  ap.add_argument("--images", type=int, default=32, help="synthetic calibration images "
                  "(the paper: 32)")
  ap.add_argument("--steps", type=int, default=100, help="synthesis steps, even (2 rounds; "
                  "the paper: 1000)")
  ap.add_argument("--recon_iters", type=int, default=100, help="reconstruction iterations per "
                  "unit (the paper: 100)")
  ap.add_argument("--eval_images", type=int, default=5000, help="evaluation images (JPEGs)")
  ap.add_argument("--eval_batch", type=int, default=128)
  ap.add_argument("--data_dir", default="", help="where the JPEGs go and stay (default: a "
                  "temporary directory, removed at the end)")
  ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads")
  ap.add_argument("--peak_tflops", type=float, default=0.0, help="the device's peak TFLOP/s at "
                  "the precision used, for a device missing from the table")
  opts = ap.parse_args()
  for name in ("images", "steps", "eval_images", "eval_batch", "workers"):
    if getattr(opts, name) < 1:
      sys.exit(f"--{name} must be >= 1")
  if opts.steps < 2 or opts.steps % 2:
    sys.exit(f"--steps={opts.steps}: must be even and >= 2 (two rounds of steps / 2)")
  if opts.recon_iters < 1:
    sys.exit("--recon_iters must be >= 1")

  with tempfile.TemporaryDirectory(prefix="spdfq_pipeline_") as tmp:
    data_dir = opts.data_dir or os.path.join(tmp, "imagenet")
    t = time.perf_counter()
    wrote = write_image_folder(data_dir, opts.eval_images, workers=opts.workers)
    write_s = time.perf_counter() - t
    checkpoint = os.path.join(tmp, "random.safetensors")
    t = time.perf_counter()
    random_checkpoint(checkpoint, opts.arch)
    build_s = time.perf_counter() - t
    config = run_config(checkpoint, data_dir, opts)
    ticks = Ticks()
    with timed_eval_batches(ticks), timed_recon_iterations(ticks):
      out = spdfq_main.run(config, os.path.join(tmp, "work"), timed_stages(ticks),
                     config_name="configs/vitb_w4a4.py (random weights)")
    module, params, _ = native.load(checkpoint)
    flops, flops_s = step_flops(config, module, params)
    report(opts, out, ticks, build_s, flops, flops_s, wrote, write_s)


if __name__ == "__main__":
  main()
