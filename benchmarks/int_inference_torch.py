"""PyTorch side of benchmarks/int_inference.py (run with a python that has torch and timm).

  python benchmarks/int_inference_torch.py --models vit_base_patch16_224 --batches 1,8 \
      --repeats 7 [--threads 2]

timm's model with random weights, FP32 and `torch.ao.quantization.quantize_dynamic` on
every nn.Linear (int8 weights, activations quantized on the fly); prints one JSON line per
(model, batch) with images/s (median of --repeats, runs interleaved).
"""
import argparse
import json
import statistics
import time

import timm
import torch


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--models", required=True)
  p.add_argument("--batches", default="1,8")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--threads", type=int, default=0)
  a = p.parse_args()
  if a.threads:
    torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  for name in a.models.split(","):
    kw = {} if ":" not in name else {"img_size": int(name.split(":")[1])}
    fp = timm.create_model(name.split(":")[0], pretrained=False, **kw).eval()
    q = torch.ao.quantization.quantize_dynamic(fp, {torch.nn.Linear}, dtype=torch.qint8)
    size = kw.get("img_size", 224)
    for batch in map(int, a.batches.split(",")):
      x = torch.randn(batch, 3, size, size)
      times = {"torch_fp32": [], "torch_dynamic_int8": []}
      with torch.inference_mode():
        for m in (fp, q):
          m(x)
        for _ in range(a.repeats):
          for k, m in (("torch_fp32", fp), ("torch_dynamic_int8", q)):
            t = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t)
      print(json.dumps({"model": name, "batch": batch, "threads": torch.get_num_threads(),
                        **{k: round(batch / statistics.median(v), 2) for k, v in times.items()}}),
            flush=True)


if __name__ == "__main__":
  main()
