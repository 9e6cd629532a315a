"""Synthesis hyperparameters as one ConfigDict per method.

Defaults follow docs/method.md ("Synthesis objective", "Baselines"); fields marked (open)
in docs/synthesis.md are reconstruction choices that no available source fixes.
"""
from __future__ import annotations

import ml_collections

METHODS = ("noise", "inversion", "psaq", "spdfq", "smi", "psaq_v2", "mimiq")
# PSAQ-ViT V2 has no published code: it is built from its paper (docs/synthesis.md lists
# every choice the paper leaves open), and says so wherever it is listed.
PSAQ_V2_LABEL = "PSAQ-ViT V2 (from the paper; no reference code)"
SMI_SWIN_REFUSAL = (
    "method smi needs a ViT or DeiT: SMI ranks and drops patch tokens by the class token's "
    "attention after the position embedding, Swin has no class token and its shifted windows "
    "need the whole grid, and the reference (Egg-Hu/SMI) runs ViT/DeiT only; choose noise, "
    "inversion, psaq or spdfq for a Swin model.")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_config(method: str = "spdfq", family: str = "vit") -> ml_collections.ConfigDict:
  """Defaults for `method` (noise | inversion | psaq | spdfq | smi | psaq_v2 | mimiq) on a
  `family` (vit | swin) model.

  The method only sets which loss terms are on; every term stays a field, so an ablation is
  a config edit (e.g. `cfg.msr = False`).
  """
  if method not in METHODS:
    raise ValueError(f"unknown synthesis method {method!r}; choose one of {', '.join(METHODS)}")
  if family not in ("vit", "swin"):
    raise ValueError(f"unknown model family {family!r} (vit | swin)")
  if method == "smi" and family == "swin":
    raise ValueError(SMI_SWIN_REFUSAL)
  c = ml_collections.ConfigDict()
  c.method = method
  c.num_images = 32
  # 0 = read from the model (head size, img_size, patch-embedding input channels).
  c.num_classes = 0
  c.image_size = 0
  c.channels = 0
  # Normalisation of the model's inputs: images are optimised in normalised space and each
  # channel is clamped to [(0 - mean) / std, (1 - mean) / std]. One value = every channel.
  c.mean = IMAGENET_MEAN
  c.std = IMAGENET_STD
  c.seed = 0

  # Optimiser (PSAQ-ViT's loop): one Adam on the pixels for the whole run; the lr schedule
  # restarts each round: base * (t + 1) / warmup for t < warmup, then cosine towards zero.
  c.iterations = 1000
  c.rounds = 2
  c.lr = 0.25 if family == "swin" else 0.2
  c.b1 = 0.5
  c.b2 = 0.9
  c.eps = 1e-8
  c.warmup = 100
  # Roll limit in px per round at jitter_reference px input (open: scaling). Set (0, 0) for
  # a model trained without translation augmentation (the Fashion-MNIST assets).
  c.jitter = (15, 30)
  c.jitter_reference = 224  # 0 = use `jitter` as given, whatever the input size
  c.flip = True
  # The start N(0, 1) is not clamped (PSAQ-ViT clips only after each step); True clamps it
  # to the pixel range (then the noise baseline is clamped noise too).
  c.clamp_init = False

  # TV prior (PSAQ-ViT form), on the jittered image. tv_mode: 'target' minimises
  # |TV - U(tv_target)| (drawn once per run); 'min' minimises TV, which outweighs the class
  # term and leaves the images far smoother than real ones (open).
  c.tv_weight = 0.05
  c.tv_mode = "target"
  c.tv_target = (2500.0, 3000.0)
  # PSAQ-ViT's target is set for 32 images of 224 x 224 x 3 and used as is. True scales it
  # by sqrt(values in the batch / 32 x 224 x 224 x 3), for other batch or image sizes.
  c.tv_target_scaled = False

  # CE to the drawn class (every method but PSAQ-ViT V2, which drops the class guidance).
  c.class_guidance = method != "psaq_v2"

  # PSAQ-ViT patch-similarity entropy (V1 and V2).
  c.entropy = method in ("psaq", "psaq_v2")
  c.entropy_weight = 1.0
  c.entropy_bandwidth = 0.01
  c.entropy_points = 10
  # KDE grid span: 'batch' = min..max over all valid images (PSAQ-ViT); 'image' = each
  # image's own min..max (keeps images independent of each other).
  c.entropy_grid = "batch"
  # Swin: PSAQ-ViT drops token 0 of every window (`[:, 1:]`); True keeps all of them.
  c.entropy_swin_all_tokens = False

  # SPDFQ switches (independent: the 8-row ablation flips them).
  spdfq = method == "spdfq"
  c.apa = spdfq
  c.msr = spdfq
  c.sl = spdfq

  # APA.
  c.alpha1 = 1000.0  # searched per model in [1, 1e5] (open default)
  c.prior = "gmm"  # gmm | laplace | real (real needs `real_images`)
  c.k_apa = 5  # components k ~ U{1..k_apa} (open)
  c.sigma_range = (1.0, 3.0)  # in grid cells (open)
  c.apa_blocks = "deep"  # deep (l >= L/2) | all
  c.depth_weight = True  # weight l / L (False: 1)
  # Deviation (off = method.md), ViT/DeiT only: the roll jitter moves the image by whole
  # patches (each offset rounded to the nearest multiple of the patch size) and the priors
  # roll and flip with it, so APA asks for attention on the same image content every step.
  # With method.md's fixed priors under a roll of up to 1-2 patches, the attention does not
  # follow its priors at any usable alpha1; moving the priors without rounding the roll does
  # not help either (BENCHMARKS.md, "Is APA achieved on the scenes bed?").
  c.apa_follows_jitter = False

  # MSR.
  c.k_msr = 4  # m ~ U{1..k_msr} regions per image and step
  c.msr_grid = 2  # regions are the cells of a msr_grid x msr_grid split (open)

  # SL: target softmax(Z), Z zero except U(soft_label_range) at the class.
  c.soft_label_range = (5.0, 10.0)
  c.whole_target_has_regions = False  # (open) whole-image Z also carries the region classes

  # SMI (method 'smi', synth/smi.py): at each step of smi_prune_at (the reference README's
  # 50, 100, 200, 300 of 4000) the patch tokens kept so far lose the fraction
  # smi_prune_ratio[i] that the last block's class token attends to least; () inverts
  # densely. Each ordinary step rolls H and W by independent offsets of up to
  # smi_jitter x the image side (the reference's 1/8). Steps past `iterations` are never
  # reached, but the final mask counts every ratio, as in the reference.
  c.smi_prune_at = (50, 100, 200, 300)
  c.smi_prune_ratio = (0.3, 0.3, 0.3, 0.3)
  c.smi_jitter = 0.125
  # The reference calibrates on the kept patches only (its pruned ones are zero and dropped
  # after the position embedding); here calibration and reconstruction do so. False feeds
  # every patch, the zero ones included (a deviation).
  c.smi_calibrate_kept = True
  if method == "smi":  # test_quant.py's inversion settings
    c.iterations, c.rounds, c.warmup = 4000, 1, 0
    c.lr, c.b1, c.b2 = 0.25, 0.5, 0.99
    c.tv_weight, c.tv_mode = 1e-4, "min"  # tv2: L2 TV of the image before the jitter

  # PSAQ-ViT V2 (method 'psaq_v2', synth/psaq_v2.py; from the paper, every value open): the
  # images and a quantized student take turns under the FP teacher. Each step the images
  # also maximise v2_adversarial_weight x KL(teacher || student) on the jittered batch, then
  # the student's latent weights take one Adam step (v2_student_lr) minimising that KL on
  # the updated images. The student is quantized at W{v2_w_bits}A{v2_a_bits}: the pipeline
  # sets the row's bits (0 = unset, refused).
  c.v2_w_bits = 0
  c.v2_a_bits = 0
  c.v2_adversarial_weight = 1.0
  c.v2_student_lr = 1e-5

  # MimiQ (method 'mimiq', synth/mimiq.py), its generation script's values (MaskAQ at
  # 3245400, `hydra_image_gen_ssim_att_map.py`): AdamW with decoupled weight decay, lr
  # annealed by a cosine to mimiq_lr_min; loss mimiq_ssim_weight * SSIM term (1 - SSIM^2
  # between heads' attention score maps) + mimiq_ce_weight * CE + tv_weight * TV of the
  # image before the jitter; each step's view adds a per-channel Gaussian offset of scale
  # mimiq_noise_std x (falling with the step) and a colour jitter (x - m) / s, m ~ U(-a, a),
  # s = exp(U(-b, b)), (a, b) = mimiq_color_jitter.
  c.mimiq_weight_decay = 1e-6
  c.mimiq_lr_min = 0.001
  c.mimiq_ssim_weight = 1.0
  c.mimiq_ce_weight = 1.0
  c.mimiq_noise_std = 0.5
  c.mimiq_color_jitter = (1.0, 1.0)
  if method == "mimiq":
    # 2000 steps (MaskAQ's trainer.py calls the script with iter=2000). `jitter` is the roll
    # limit of the first and the second half of the steps, independent for H and W.
    c.iterations, c.rounds, c.warmup = 2000, 1, 0
    c.lr, c.b1, c.b2, c.eps = 0.1, 0.9, 0.999, 1e-8
    c.tv_weight, c.tv_mode = 2.5e-5, "min"
    c.jitter, c.flip = (8, 16), False

  c.checkpoint_every = 100

  # How the loop runs (not what it computes, so not part of a run's identity; see
  # RUNTIME_FIELDS): the step's losses stay on the device and are read every `log_every`
  # steps (and at each checkpoint). `remat` recomputes each transformer block's activations
  # in the backward pass instead of keeping them; `microbatches` > 1 runs the model terms
  # and their gradient on that many parts of the batch in turn (the batch TV still sees the
  # whole batch; refused with the entropy term's batch-wide KDE grid). Both cut the step's
  # memory for the same images, up to float rounding.
  c.log_every = 50
  c.remat = False
  c.microbatches = 1
  # 'bfloat16' runs the model's matmuls (dense, patch convolution, attention) on bfloat16
  # operands with float32 results; images, Adam state, LayerNorm, softmax and losses stay
  # float32. It changes the images slightly, so it is part of a run's identity.
  c.compute_dtype = "float32"
  return c


RUNTIME_FIELDS = ("log_every", "remat", "microbatches")


# Fields added after runs were cached, at the value that keeps those runs' identity.
LATER_FIELDS = {"compute_dtype": "float32", "apa_follows_jitter": False,
                "smi_prune_at": (50, 100, 200, 300), "smi_prune_ratio": (0.3, 0.3, 0.3, 0.3),
                "smi_jitter": 0.125, "smi_calibrate_kept": True, "class_guidance": True}

# Fields that only one method reads: they count in that method's identity only.
METHOD_PREFIXES = {"smi": "smi_", "psaq_v2": "v2_", "mimiq": "mimiq_"}


def identity(cfg: ml_collections.ConfigDict) -> dict:
  """The fields that decide the images: the config without `RUNTIME_FIELDS`, without the
  `LATER_FIELDS` left at their defaults (the identity a run had before they existed), and
  without one method's own fields (`METHOD_PREFIXES`) for the other methods, which never
  read them."""
  foreign = tuple(p for m, p in METHOD_PREFIXES.items() if m != cfg.method)
  return {k: v for k, v in cfg.to_dict().items()
          if k not in RUNTIME_FIELDS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])
          and not k.startswith(foreign)}
