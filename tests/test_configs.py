"""Every config parses, its fields are consistent, and command-line overrides reach it."""
import glob
import os

from absl import flags
from ml_collections import config_flags
import pytest

from spdfq_jax import rows as rows_lib
from spdfq_jax.models import convert, zoo
from spdfq_jax.quant import config as quant_config
from spdfq_jax.synth import config as synth_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CONFIGS = sorted(f for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                     if os.path.basename(f) not in ("common.py", "fmnist_train.py", "scenes_train.py"))
PAPER_MODELS = ("vit_small", "vit_base", "deit_tiny", "deit_small", "deit_base",
                "swin_small", "swin_base")


def _parse(argv):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "fmnist_w4a4.py"),
                                  flag_values=fv, lock_config=True, sys_argv=["prog"] + argv)
  fv(["prog"] + argv)
  return fv.config


def _check(c):
  assert c.model.name in zoo.REGISTRY or c.model.name in convert.ASSETS
  assert c.data.name in ("imagenet", "fashion_mnist", "scenes")
  assert c.data.source in ("auto", "folder", "tfds")
  assert c.eval.batch_size > 0 and c.eval.limit >= 0 and c.num_images > 0
  family = "vit"
  for method, w, a in rows_lib.rows_of(c):
    assert method in synth_config.METHODS + (rows_lib.REAL,)
    assert 2 <= w <= 8 and 2 <= a <= 8
    if method != rows_lib.REAL:
      scfg = synth_config.default_config(method, family)
      for k, v in rows_lib.set_fields(c.synth).items():
        rows_lib.assign(scfg, k, v)  # every set synthesis field exists
      assert scfg.iterations % scfg.rounds == 0
    stages = rows_lib.Stages(None, None, None, quant_config.default_config, None, None)
    q = rows_lib.quant_config(stages, c, w, a)  # validates
    assert (q.weights.bits, q.acts.bits) == (w, a)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=os.path.basename)
def test_config_parses_and_is_consistent(path):
  _check(_parse([f"--config={path}"]))


@pytest.mark.parametrize("model", PAPER_MODELS)
@pytest.mark.parametrize("bits", ("w4a4", "w6a6", "w3a3"))
def test_paper_settings(model, bits):
  c = _parse([f"--config={ROOT}/configs/{model}.py:{bits}"])
  _check(c)
  w, a = int(bits[1]), int(bits[3])
  assert (c.quant.w_bits, c.quant.a_bits) == (w, a)
  tag = zoo.entry(c.model.name).checkpoint_tag
  assert tag in c.model.checkpoint
  if bits == "w4a4":
    doc = open(f"{ROOT}/configs/{model}.py").read().split('"""')[1]
    for method in ("spdfq", "psaq", "noise"):
      assert f"{c.paper[f'{method}_w4a4']:.2f}" in doc
    assert f"{c.paper.fp:.2f}" in doc and f"--config=configs/{model}.py" in doc


def test_vitb_w4a4_and_overrides():
  c = _parse([f"--config={ROOT}/configs/vitb_w4a4.py", "--config.quant.w_bits=3",
              "--config.synth.iterations=4", "--config.quant.recon.iters=2",
              "--config.data.dir=/tmp/x", "--config.methods=noise,spdfq"])
  assert c.model.name == "vit_base_patch16_224" and c.paper.spdfq_w4a4 == pytest.approx(51.84)
  assert rows_lib.rows_of(c) == [("noise", 3, 4), ("spdfq", 3, 4)]
  assert rows_lib.set_fields(c.synth) == {"iterations": 4}
  stages = rows_lib.Stages(None, None, None, quant_config.default_config, None, None)
  assert rows_lib.quant_config(stages, c, 3, 4).recon.iters == 2
  with pytest.raises(Exception):
    _parse([f"--config={ROOT}/configs/vitb_w4a4.py", "--config.quant.no_such_field=1"])


@pytest.mark.parametrize("name", ["fmnist_compare", "scenes_compare"])
def test_compare_config_rows(name):
  c = _parse([f"--config={ROOT}/configs/{name}.py"])
  rows = rows_lib.rows_of(c)
  assert len(rows) == 16 and {m for m, _, _ in rows} == {
      "noise", "inversion", "psaq", "psaq_v2", "spdfq", "smi", "mimiq", "real"}
  assert {(w, a) for _, w, a in rows} == {(4, 4), (3, 3)}
