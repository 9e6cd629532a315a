"""Synthesis benchmarks: step time split, and calibration quality on the built-in test beds.

  python benchmarks/synthesis.py timing [--models fmnist_vit,deit_tiny_patch16_224,...]
      Seconds per synthesis iteration (batch 32, random weights), split into the bare
      model forward+backward (same model evaluations, loss = sum of logits) and the loss
      overhead (taps, APA/entropy/TV/CE, MSR crop+resize, Adam, clamp) = step - bare.
      Method `spdfq_nomsr` = SPDFQ without the 4 MSR region evaluations per image.
  python benchmarks/synthesis.py speed [--models vit_base_patch16_224] [--methods ...]
      Seconds per image of each source's whole run at its default length (PSAQ-ViT and
      SPDFQ 1000 steps, SMI 4000 with its pruning plan; `smi_dense` = SMI without pruning),
      from the median step time of each kind of step, all timed round-robin.
  python benchmarks/synthesis.py synthesize [same flags as accuracy]
      Only the synthetic sets, cached under --workroot (e.g. on a GPU; `accuracy` then reads
      them from the same workroot).
  python benchmarks/synthesis.py accuracy [--seeds 0,1,2] [--iterations 100] [--family vit]
      W4A4 / W3A3 Fashion-MNIST test top-1 after the full quantization stage, calibrated on
      32 images from each source (noise, inversion, psaq, psaq_v2, spdfq, smi, mimiq, real),
      mean +- std over
      seeds; `--ablation` adds the 8 APA/MSR/SL rows; `--family swin` uses the Swin asset;
      `--bed scenes` the scenes test bed (48x48 RGB, asset scenes_<family>) instead;
      `--preset reparam` stops at calibration + reparameterisation (no reconstruction);
      `--quant recon_iters=20,...` overrides quantization settings, `--synth
      apa_follows_jitter=True,...` synthesis settings; `--compute-dtype bfloat16`
      synthesises with bfloat16 matmuls; `--eval-split train10k`
      scores on the last 10,000 training images, to compare settings without the test split.
      Accuracies are kept in WORKROOT/accuracy.json: a rerun only adds what is missing.
Prints markdown tables (the ## Synthesis section of BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import quant_engine as qe  # noqa: E402
import step_util  # noqa: E402
from configs import fmnist_w4a4, scenes_w4a4  # noqa: E402
from spdfq_jax import checkpoint, synth  # noqa: E402
from spdfq_jax.models import zoo  # noqa: E402

G = importlib.import_module("spdfq_jax.synth.generate")
from step_util import machine, timing_model  # noqa: E402
# Test bed -> (asset name prefix, data module, the demo config's synthesis settings).
BEDS = {"fmnist": ("fmnist", "fashion_mnist", fmnist_w4a4.SYNTH),
        "scenes": ("scenes", "scenes", scenes_w4a4.SYNTH)}


# ------------------------------------------------------------------------------ timing


def _time_pair(a, a_args, b, b_args, iters: int) -> tuple[float, float]:
  """Min seconds of two functions timed alternately (the machine is shared: the min is the
  least disturbed run, and alternating exposes both to the same background load)."""
  jax.block_until_ready(a(*a_args))  # compile + one warm run
  jax.block_until_ready(b(*b_args))
  ta, tb = [], []
  for _ in range(iters):
    for fn, args, out in ((a, a_args, ta), (b, b_args, tb)):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      out.append(time.perf_counter() - t)
  return min(ta), min(tb)


def time_method(module, params, shape, method: str, iters: int) -> tuple[float, float]:
  """(step seconds, bare forward+backward seconds) for one method at batch 32."""
  cfg = synth.default_config(method.replace("_nomsr", ""))
  cfg.update(mean=(0.5,), std=(0.5,), msr=cfg.msr and not method.endswith("_nomsr"))
  step, args = step_util.synth_step(module, params, cfg, donate=False)
  x = args[1]
  r = cfg.msr_grid ** 2 if cfg.msr else 0

  @jax.jit
  def bare(params, x, xr):
    def f(x, xr):
      out = module.apply({"params": params}, x).sum()
      if r:
        out = out + module.apply({"params": params}, xr).sum()
      return out
    return jax.grad(f, argnums=(0, 1))(x, xr)

  xr = jnp.concatenate([x] * r) if r else jnp.zeros((0,) + shape)
  return _time_pair(step, args, bare, (params, x, xr), iters)


def run_timing(models: list[str], methods: list[str], iters: int) -> None:
  print(f"Machine: {machine()}\n")
  print("| model | input | method | step s/iter | bare fwd+bwd s | loss overhead | overhead % |")
  print("|---|---|---|---|---|---|---|")
  for name in models:
    module, shape = timing_model(name)
    params = step_util.random_params(module, shape)
    for method in methods:
      t_step, t_bare = time_method(module, params, shape, method, iters)
      print(f"| {name} | {shape[0]}x{shape[1]}x{shape[2]} | {method} | {t_step:.3f} | "
            f"{t_bare:.3f} | {t_step - t_bare:.3f} | {100 * (t_step - t_bare) / t_bare:.1f} |",
            flush=True)


# ------------------------------------------------------------------------------- speed


def _smi_variants(module, params, cfg, batch: int) -> tuple[dict, list[int]]:
  """{('smi', tokens): (fn, args)} one jittered SMI step per phase of the plan, and the
  plan's per-step patch-token counts."""
  from spdfq_jax import parallel  # noqa: PLC0415
  from spdfq_jax.synth import layout as layout_lib, smi  # noqa: PLC0415
  import optax  # noqa: PLC0415
  info = layout_lib.model_info(module, params, cfg)
  plan = smi.make_plan(cfg, info)
  mesh = parallel.data_mesh()
  step = smi.make_step(module, cfg, info, mesh, donate=False)
  patches = info.grid[0] ** 2
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch,) + info.image_shape,
                                                           np.float32))
  fixed = {"mask": jnp.ones(batch), "targets": jax.nn.one_hot(jnp.arange(batch), info.num_classes)}
  row = {"shift_h": np.int32(3), "shift_w": np.int32(-5), "flip": np.bool_(True)}
  out = {}
  for tokens in sorted(set(plan.tokens), reverse=True):
    keep = jnp.asarray(smi.full_keep(batch, info)[:, :info.prefix + tokens])
    fn = (lambda tokens: lambda x, keep: step(
        params, x, optax.scale_by_adam(cfg.b1, cfg.b2).init(x), keep, fixed, row,
        kind=smi.JIT, remap=tokens < patches, k_next=None))(tokens)
    out[("smi", tokens)] = (fn, (x, keep))
  return out, list(plan.tokens)


def run_speed(models: list[str], methods: list[str], batch: int, iters: int) -> None:
  """Seconds per image of a whole synthesis run of each source at its own default length,
  from the median time of one step (batch `batch`, random weights) of each kind it runs;
  SMI's run sums its phases' step times over its pruning plan. Every step is compiled
  first, then all are timed round-robin, so they share the machine's load."""
  print(f"Machine: {machine()}; batch {batch}; median of {iters} round-robin timings\n")
  print("| model | source | steps (default) | s / step | s / image, whole run | time / PSAQ-ViT's |")
  print("|---|---|---|---|---|---|")
  for name in models:
    module, shape = timing_model(name)
    params = step_util.random_params(module, shape)
    variants, plans = {}, {}
    for method in methods:
      cfg = synth.default_config(method.replace("_dense", ""))
      cfg.update(num_images=batch, mean=(0.5,), std=(0.5,))
      if method == "smi_dense":
        cfg.update(smi_prune_at=(), smi_prune_ratio=())
      if method.startswith("smi"):
        v, tokens = _smi_variants(module, params, cfg, batch)
        variants.update({(method, k[1]): f for k, f in v.items()})
        plans[method] = tokens
      else:
        step, args = step_util.synth_step(module, params, cfg, donate=False)
        variants[(method, None)] = (step, args)
        plans[method] = [None] * cfg.iterations
    for fn, args in variants.values():  # compile + one warm run each
      jax.block_until_ready(fn(*args))
    times = {k: [] for k in variants}
    for _ in range(iters):
      for k, (fn, args) in variants.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_image = {m: sum(med[(m, k)] for k in plans[m]) / batch for m in methods}
    for m in methods:
      steps = ", ".join(f"{med[(m, k)]:.3f} ({k} patches)" if k is not None else
                        f"{med[(m, k)]:.3f}" for k in dict.fromkeys(plans[m]))
      ratio = per_image[m] / per_image["psaq"] if "psaq" in per_image else None
      print(f"| {name} | {m} | {len(plans[m])} | {steps} | {per_image[m]:.1f} | "
            + (f"{ratio:.2f}" if ratio is not None else "-") + " |", flush=True)


# ---------------------------------------------------------------------------- accuracy

ABLATION = [(a, m, s) for a in (False, True) for m in (False, True) for s in (False, True)]


def ablation_rows(spec: str) -> list[tuple[bool, bool, bool]]:
  """'all' -> the 8 APA/MSR/SL combinations; '101,011' -> those rows; '' -> none."""
  if spec in ("", "all"):
    return ABLATION if spec else []
  return [tuple(c == "1" for c in item) for item in spec.split(",")]


def load_asset(family: str, bed: str = "fmnist"):
  from spdfq_jax.models import native  # noqa: PLC0415
  path = os.path.join(qe.ASSETS, f"{BEDS[bed][0]}_{family}.safetensors")
  module, params, _ = native.load(path)
  return module, params, path


def bed_data(bed: str):
  """The test bed's data module (fashion_mnist or scenes)."""
  from spdfq_jax import data  # noqa: PLC0415
  return data.test_bed(BEDS[bed][1])


def bed_config(method: str, family: str, bed: str, channels: int, seed: int,
               iterations: int):
  """A synthesis config on a test bed: the bed's normalisation and, for every method that
  runs the model, the demo config's settings (jitter, TV target, alpha1) at this length."""
  data = bed_data(bed)
  cfg = synth.default_config(method, family)
  mean, std = np.broadcast_to(data.MEAN, (channels,)), np.broadcast_to(data.STD, (channels,))
  cfg.update(seed=seed, mean=tuple(map(float, mean)), std=tuple(map(float, std)))
  if method != "noise":
    cfg.update(**BEDS[bed][2])
    cfg.update(iterations=iterations, warmup=max(1, iterations // 10))
  return cfg


def same_as_spdfq(abl) -> bool:
  """The all-on ablation row is the spdfq row: one image set, one accuracy per setting."""
  return abl in (None, (True, True, True))


def source_images(module, params, family: str, row: str, abl, seed: int, iterations: int,
                  workroot: str, alpha1: float | None, channels: int, bed: str = "fmnist",
                  prior: str = "gmm", compute_dtype: str = "float32",
                  synth_overrides: dict | None = None, bits: tuple[int, int] = (4, 4)
                  ) -> tuple[np.ndarray, dict, int]:
  """The 32 calibration images of one source, their `diagnostics` (class and prior fit;
  empty for real images) and the patches calibration keeps per image (SMI's unmasked ones,
  when its config calibrates on them; 0 = all); synthetic sets are cached under workroot by a tag of (family, row,
  seed, iterations, ablation, alpha1, prior, compute dtype, overrides), so `synthesize` (e.g.
  on a GPU) and `accuracy` (here) share them. `synth_overrides` (synthesis methods only) are
  applied last. PSAQ-ViT V2's images depend on `bits` (its student's; in its tag)."""
  data = bed_data(bed)
  if row == "real":
    return data.calibration_images(32, seed, None, channels)[0], {}, 0
  cfg = bed_config(row, family, bed, channels, seed, iterations)
  if row == "noise":  # no model evaluation: the same images for any synthesis setting
    compute_dtype, synth_overrides = "float32", {}
  else:
    synth_overrides = synth_overrides or {}
    if alpha1 is not None:
      cfg.alpha1 = alpha1
  if abl is not None:
    cfg.update(apa=abl[0], msr=abl[1], sl=abl[2])
  cfg.update(**synth_overrides)
  cfg.compute_dtype = compute_dtype
  student = None
  if row == "psaq_v2":
    from spdfq_jax.quant import student as quant_student  # noqa: PLC0415
    cfg.v2_w_bits, cfg.v2_a_bits = bits
    student = quant_student.student(module, params, *bits)
  real_prior_images = None
  if prior != "gmm" and cfg.apa:
    cfg.prior = prior
    if prior == "real":  # the FP model's attention on 32 other training images
      real_prior_images = data.calibration_images(32, 1000 + seed, None, channels)[0]
  abl_tag = "" if same_as_spdfq(abl) else "-%d%d%d" % abl
  tag = (("" if bed == "fmnist" else f"{bed}-") + f"{family}-{row}-{seed}-{iterations}" + abl_tag
         + (f"-a{cfg.alpha1:g}" if row == "spdfq" else "")
         + (f"-{prior}" if cfg.prior != "gmm" else "")
         + (f"-{compute_dtype}" if compute_dtype != "float32" else "")
         + "".join(f"-{k}{tag_value(v)}" for k, v in sorted(synth_overrides.items()))
         + ("-w%da%d" % bits if row == "psaq_v2" else ""))
  t = time.perf_counter()
  result = synth.generate(module, params, cfg, workdir=os.path.join(workroot, tag),
                          progress=False, real_images=real_prior_images, student=student)
  d = result.diagnostics  # data-free: does the FP model see the targets, the priors?
  msg = (f"class fit {100 * d['class_fit']:.0f}% of the images" if "class_fit" in d
         else "no class guidance")
  if "region_class_fit" in d:
    msg += f", {100 * d['region_class_fit']:.0f}% of the MSR regions"
  if "kept_class_fit" in d:
    msg += f", {100 * d['kept_class_fit']:.0f}% on their kept patch tokens"
  print(f"  {tag}: {msg}; prior fit {d['prior_fit']:.3f} (chance {d['prior_fit_chance']:.3f}) "
        f"({time.perf_counter() - t:.1f} s)", flush=True)
  kept = result.kept_patches
  return result.images, d, kept.shape[1] if kept is not None and cfg.smi_calibrate_kept else 0


def record_accuracy(path: str, key: str, value: float) -> dict:
  """Adds one accuracy to the workroot's file and returns every recorded one. The file is
  re-read under a lock, so runs sharing a workroot keep each other's results."""
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = json.load(open(path)) if os.path.exists(path) else {}
    done[key] = value
    checkpoint.write_text(path, json.dumps(done))
  return done


def eval_images(bed: str, split: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """The test split, or ('train10k') the last 10,000 training items, for choosing settings
  without the test split."""
  data = bed_data(bed)
  if split == "test":
    return data.load("test", None, channels)
  if bed == "fmnist":
    x, y = data.load_raw("train", None)
    return data.normalise(x[-10000:], channels), y[-10000:]
  x, y, _ = data.load_with_boxes("train", indices=np.arange(50000, 60000))
  return data.normalise(x, channels), y


def variants(rows: list[str], ablation: str) -> list[tuple[str, tuple | None]]:
  out = [(r, None) for r in rows]
  return out + ([("spdfq", v) for v in ablation_rows(ablation)] if ablation else [])


def tag_value(v) -> str:
  """An override's value in a cache directory name: tuples as 1:2."""
  return ":".join(map(str, v)) if isinstance(v, tuple) else str(v)


def run_synthesize(family: str, seeds: list[int], iterations: int, rows: list[str],
                   ablation: str, workroot: str, alpha1: float | None = None,
                   prior: str = "gmm", bed: str = "fmnist", compute_dtype: str = "float32",
                   synth_overrides: dict | None = None,
                   bits: tuple[tuple[int, int], ...] = ((4, 4), (3, 3))) -> None:
  """Synthesis only, seed-major (a cut-short run still holds whole seeds of every row)."""
  module, params, path = load_asset(family, bed)
  channels = zoo.in_channels(module, params)
  print(f"Machine: {machine()}; model {path}; synthesis iterations {iterations}\n", flush=True)
  for seed in seeds:
    for row, abl in variants([r for r in rows if r not in ("noise", "real")], ablation):
      for b in (bits if row == "psaq_v2" else bits[:1]):
        source_images(module, params, family, row, abl, seed, iterations, workroot, alpha1,
                      channels, bed, prior, compute_dtype, synth_overrides, b)


def run_accuracy(family: str, seeds: list[int], bits: list[tuple[int, int]], iterations: int,
                 rows: list[str], ablation: str, workroot: str,
                 alpha1: float | None = None, preset: str = "full",
                 quant_overrides: dict | None = None, eval_split: str = "test",
                 prior: str = "gmm", bed: str = "fmnist", compute_dtype: str = "float32",
                 synth_overrides: dict | None = None) -> None:
  from spdfq_jax import quant  # noqa: PLC0415
  module, params, path = load_asset(family, bed)
  channels = zoo.in_channels(module, params)
  x_test, y_test = eval_images(bed, eval_split, channels)
  print(f"Machine: {machine()}; model {path}; synthesis iterations {iterations}; "
        f"quantization preset {preset} {quant_overrides or ''}; synthesis overrides "
        f"{synth_overrides or '-'}; evaluated on {eval_split}\n")
  fp = qe.top1(module, {"params": params}, x_test, y_test, 1000)
  print(f"FP top-1: {fp:.2f}\n")
  results, fits, chance = {}, {}, {}
  # Finished (source, seed, bits) accuracies, so a rerun with more rows or seeds adds only
  # what is new.
  done_path = os.path.join(workroot, "accuracy.json")
  os.makedirs(workroot, exist_ok=True)
  done = json.load(open(done_path)) if os.path.exists(done_path) else {}
  for row, abl in variants(rows, ablation):
    for seed in seeds:
      synthetic = row not in ("noise", "real")  # settings of synthesis only in its keys
      for i, (w, a) in enumerate(bits):
        if i == 0 or row == "psaq_v2":  # V2's images are made per bit setting
          images, diag, sparse = source_images(module, params, family, row, abl, seed,
                                               iterations, workroot, alpha1, channels, bed,
                                               prior, compute_dtype, synth_overrides, (w, a))
          if diag and i == 0:
            fits.setdefault((row, abl), []).append(diag["prior_fit"])
            chance.setdefault((row, abl), []).append(diag["prior_fit_chance"])
        key = json.dumps([family, row, None if same_as_spdfq(abl) else abl, seed, iterations,
                          alpha1 if synthetic else None,
                          prior if synthetic else "gmm", w, a, preset,
                          quant_overrides or {}, eval_split] + ([] if bed == "fmnist" else [bed])
                         + ([] if compute_dtype == "float32" or not synthetic
                            else [compute_dtype])
                         + ([synth_overrides] if synth_overrides and synthetic else []))
        if key not in done:
          qm = quant.quantize(module, params, images,
                              quant.default_config(w, a, preset, **(quant_overrides or {})),
                              progress=False, sparse_patches=sparse)
          done = record_accuracy(done_path, key,
                                 qe.top1(qm.module, qm.variables, x_test, y_test, 1000))
        acc = done[key]
        results.setdefault((row, abl, w, a), []).append(acc)
        print(f"  {row} {abl} seed {seed} W{w}A{a}: {acc:.2f}", flush=True)
  print_tables(results, fits, chance, bits, rows, ablation)


def _ms(v: list[float]) -> str:
  return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"


def _fit(fits, chance, key) -> str:
  """'prior fit (chance)' of a source, means over seeds; '-' for real images."""
  if key not in fits:
    return "-"
  return f"{statistics.mean(fits[key]):.3f} ({statistics.mean(chance[key]):.3f})"


def print_tables(results, fits, chance, bits, rows, ablation) -> None:
  print("\n| source | " + " | ".join(f"W{w}A{a} top-1" for w, a in bits) + " | "
        + " | ".join(f"W{w}A{a} gap closed" for w, a in bits) + " | prior fit (chance) |")
  print("|---" * (2 + 2 * len(bits)) + "|")
  for row in rows:
    accs = [results[(row, None, w, a)] for w, a in bits]
    gaps = []
    for w, a in bits:
      noise, real = (statistics.mean(results.get((k, None, w, a), [np.nan])) for k in ("noise", "real"))
      gaps.append((statistics.mean(results[(row, None, w, a)]) - noise) / (real - noise))
    print(f"| {row} | " + " | ".join(_ms(v) for v in accs) + " | "
          + " | ".join(f"{g:.2f}" for g in gaps) + f" | {_fit(fits, chance, (row, None))} |")
  if ablation:
    print("\n| APA | MSR | SL | " + " | ".join(f"W{w}A{a} top-1" for w, a in bits)
          + " | prior fit (chance) |")
    print("|---|---|---|" + "---|" * (len(bits) + 1))
    for abl in ablation_rows(ablation):
      print("| " + " | ".join("✓" if f else "" for f in abl) + " | "
            + " | ".join(_ms(results[("spdfq", abl, w, a)]) for w, a in bits)
            + f" | {_fit(fits, chance, ('spdfq', abl))} |")


def parse_overrides(spec: str) -> dict:
  """'recon_iters=20,recon_lr=1e-5,recon_train=kernels' -> typed keyword overrides;
  'True' / 'False' are booleans, 'jitter=0:0' a tuple."""
  out = {}
  for item in filter(None, spec.split(",")):
    key, value = item.split("=")
    if ":" in value:
      out[key] = tuple(parse_overrides(f"v={v}")["v"] for v in value.split(":"))
      continue
    if value in ("True", "False"):
      out[key] = value == "True"
      continue
    try:
      out[key] = int(value)
    except ValueError:
      try:
        out[key] = float(value)
      except ValueError:
        out[key] = value
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("what", choices=["timing", "speed", "synthesize", "accuracy"])
  p.add_argument("--models", default="fmnist_vit,deit_tiny_patch16_224,deit_small_patch16_224,"
                                     "vit_base_patch16_224")
  p.add_argument("--methods", default="psaq,spdfq")
  p.add_argument("--iters", type=int, default=3, help="timed iterations after compile")
  p.add_argument("--batch", type=int, default=4, help="speed: images per timed step")
  p.add_argument("--family", default="vit")
  p.add_argument("--bed", default="fmnist", choices=sorted(BEDS),
                 help="test bed: fmnist (32x32 grey) or scenes (48x48 RGB)")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--bits", default="4,4;3,3")
  p.add_argument("--iterations", type=int, default=100, help="synthesis iterations")
  p.add_argument("--rows", default="noise,inversion,psaq,psaq_v2,spdfq,smi,mimiq,real")
  p.add_argument("--ablation", nargs="?", const="all", default="",
                 help="add the APA/MSR/SL rows: all 8, or a comma list of 0/1 triples (APA MSR SL)"
                      " such as 101,011")
  p.add_argument("--workroot", default="runs/bench_synth")
  p.add_argument("--alpha1", type=float, default=None,
                 help="APA weight (default: configs/fmnist_w4a4.py's)")
  p.add_argument("--preset", default="full", choices=["calib", "reparam", "full"],
                 help="quantization stage: full = (c) + reconstruction, reparam = (b)")
  p.add_argument("--prior", default="gmm", choices=["gmm", "laplace", "real"],
                 help="APA prior; real = the FP model's attention on 32 training images")
  p.add_argument("--quant", default="",
                 help="quantization overrides, e.g. recon_train=kernels,recon_iters=20")
  p.add_argument("--eval-split", default="test", choices=["test", "train10k"],
                 help="train10k = the last 10,000 training images, for choosing settings "
                      "without the test split")
  p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                 help="synth.compute_dtype: the synthesis step's matmul precision")
  p.add_argument("--synth", default="",
                 help="synthesis overrides for every synthetic row, e.g. apa_follows_jitter=True")
  a = p.parse_args()
  seeds = [int(s) for s in a.seeds.split(",")]
  rows = [r for r in a.rows.split(",") if r]
  if a.what == "timing":
    run_timing(a.models.split(","), a.methods.split(","), a.iters)
  elif a.what == "speed":
    run_speed(a.models.split(","), a.methods.split(","), a.batch, a.iters)
  bits = [tuple(int(v) for v in b.split(",")) for b in a.bits.split(";")]
  if a.what == "synthesize":
    run_synthesize(a.family, seeds, a.iterations, rows, a.ablation, a.workroot, a.alpha1,
                   a.prior, a.bed, a.compute_dtype, parse_overrides(a.synth), tuple(bits))
  elif a.what == "accuracy":
    run_accuracy(a.family, seeds, bits, a.iterations, rows, a.ablation, a.workroot, a.alpha1,
                 a.preset, parse_overrides(a.quant), a.eval_split, a.prior, a.bed,
                 a.compute_dtype, parse_overrides(a.synth))


if __name__ == "__main__":
  main()
