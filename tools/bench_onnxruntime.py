"""Would ONNX Runtime be a faster CPU backend? SD encoder/decoder through ORT vs plain diffusers eager.

    pip install onnxruntime onnx      # not project dependencies: only this measurement needs them
    python tools/bench_onnxruntime.py [--size 512] [--repeats 2]

Exports the SD preset's encoder (+ quant_conv) and decoder (post_quant_conv +) with the TorchScript
exporter (opset 17, fixed shapes) to a temporary folder, runs them with the CPU execution provider
(graph optimisations on, intra-op threads = torch's), alternating with plain diffusers eager calls
on the same weights and input in this process; best of ``--repeats`` after a warm-up call each.
Result (docs/benchmarks.md): slower than our path, so it is not used.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import kl_autoencoder as ka


class Encoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.quant_conv(self.vae.encoder(x))  # (B, 8, H/8, W/8) moments


class Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decoder(self.vae.post_quant_conv(z))  # (B, 3, 8h, 8w)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    try:
        import onnxruntime as ort
    except ImportError:
        print("needs onnxruntime and onnx: pip install onnxruntime onnx", file=sys.stderr)
        return 2
    vae = ka.create("sd-kl-f8", seed=0)  # random but fixed weights: speed does not depend on training
    g = torch.Generator().manual_seed(0)
    inputs = {
        "encode": (Encoder(vae), torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1),  # [-1, 1]
        "decode": (Decoder(vae), torch.randn(1, 4, args.size // 8, args.size // 8, generator=g)),
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size} px")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (module, x) in inputs.items():
            path = str(Path(tmp) / f"{name}.onnx")
            torch.onnx.export(module, (x,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
            session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            feed = {"x": x.numpy()}

            def plain():
                with torch.no_grad():
                    return module(x)

            def onnx():
                return torch.from_numpy(session.run(None, feed)[0])

            best = {"plain": float("inf"), "onnxruntime": float("inf")}
            outs = {k: f() for k, f in (("plain", plain), ("onnxruntime", onnx))}  # warm-up
            for _ in range(args.repeats):
                for k, f in (("plain", plain), ("onnxruntime", onnx)):
                    start = time.perf_counter()
                    outs[k] = f()
                    best[k] = min(best[k], time.perf_counter() - start)
            err = float((outs["plain"] - outs["onnxruntime"]).abs().max())
            print(f"{name}: plain {best['plain']:.2f} s, onnxruntime {best['onnxruntime']:.2f} s "
                  f"(x{best['plain'] / best['onnxruntime']:.2f}), max |err| {err:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
