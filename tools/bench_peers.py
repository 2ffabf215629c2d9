"""Our CPU inference against every CPU engine a user could pick, fp32 and bf16, in one run.

    pip install openvino onnxruntime onnx      # optional peers, not project dependencies
    python tools/bench_peers.py                # SD preset, 512 and 256 px, best of 5
    python tools/bench_peers.py --sizes 256 --repeats 2 --contenders plain ours_fp32 ours_bf16

Contenders (each in its own process, alternated call by call, so load from other processes hits all
alike and no process inherits another's heap):

- ``plain``: diffusers eager fp32, ``vae.encode(x).latent_dist.mean`` / ``vae.decode(z).sample`` under
  ``torch.no_grad`` (what a diffusers user gets; the reference for every error column).
- ``ours_fp32``: ``ka.optimize_inference(vae)`` then ``ka.encode_moments`` / ``ka.decode``.
- ``ours_bf16``: the same with the weights in bf16 (``vae.to(torch.bfloat16)``, what ``ka.load(path,
  dtype="bf16")`` does).
- ``diffusers_bf16``: diffusers eager with ``vae.to(torch.bfloat16)`` (what diffusers users do on GPUs).
- ``openvino_fp32`` / ``openvino_default``: OpenVINO CPU plugin on ``openvino.convert_model`` of the
  encoder (+ quant_conv) and (post_quant_conv +) decoder, with ``INFERENCE_PRECISION_HINT=f32`` / with
  default settings (bf16 where the CPU has it).
- ``onnxruntime``: ONNX Runtime CPU EP on a TorchScript ONNX export (opset 17), all graph optimisations.
- ``torch_compile``: ``torch.compile`` (inductor) of the same encoder/decoder modules, fp32.

All run the SD preset with random but fixed weights (seed 0; speed does not depend on training) on the
same input: an image in [-1, 1] for encode, and for decode the plain encoder's latent of it. Every
contender gets ``--threads`` intra-op threads. After one untimed warm-up call each (compilation,
weight packing), the best of ``--repeats`` wall times is reported with that call's CPU seconds
(the contender process's user + system time). Quietness: for every call, the CPU seconds used by
other processes (busy time in /proc/stat minus this process's and the contender's own), so a
figure measured on a loaded machine can be recognised. Errors: max abs difference to plain's output
of the same call, and for decode the PSNR (8-bit, ``evaluation.metrics.psnr``) against plain's image.

The last line is machine-readable (at the largest size):
``decode_fp32_vs_plain=<x> encode_fp32_vs_plain=<y> decode_bf16_vs_openvino=<z> encode_bf16_vs_openvino=<w>``
(plain / ours_fp32 and openvino_default / ours_bf16, wall time; nan where a contender was skipped).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import resource
import sys
import tempfile
import time

import torch

CONTENDERS = {
    "plain": ("diffusers eager fp32", None),
    "ours_fp32": ("ka.optimize_inference + ka.encode_moments / ka.decode, fp32", None),
    "ours_bf16": ("the same with bf16 weights (ka.load(..., dtype='bf16'))", None),
    "diffusers_bf16": ("diffusers eager, vae.to(torch.bfloat16)", None),
    "openvino_fp32": ("OpenVINO CPU, INFERENCE_PRECISION_HINT=f32", "openvino"),
    "openvino_default": ("OpenVINO CPU, default settings", "openvino"),
    "onnxruntime": ("ONNX Runtime CPU EP, TorchScript export opset 17", "onnxruntime"),
    "torch_compile": ("torch.compile (inductor), fp32", None),
}


def busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(a) for a in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Encoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.quant_conv(self.vae.encoder(x))  # (B, 8, H/8, W/8) moments


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decoder(self.vae.post_quant_conv(z))  # (B, 3, 8h, 8w)


def _openvino(vae, x, z, threads: int, default: bool, tmp: str):
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if not default:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    with torch.no_grad():
        enc = core.compile_model(ov.convert_model(_Encoder(vae), example_input=x), "CPU", config)
        dec = core.compile_model(ov.convert_model(_Decoder(vae), example_input=z), "CPU", config)
    print(f"    openvino {ov.__version__}: encoder runs in {enc.get_property('INFERENCE_PRECISION_HINT')}", flush=True)
    return (lambda: torch.from_numpy(enc(x.numpy())[0][:, :4].copy()),
            lambda: torch.from_numpy(dec(z.numpy())[0].copy()))


def _onnxruntime(vae, x, z, threads: int, tmp: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = []
    for name, module, inp in (("encoder", _Encoder(vae), x), ("decoder", _Decoder(vae), z)):
        path = os.path.join(tmp, f"{name}.onnx")
        torch.onnx.export(module, (inp,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
        sessions.append(ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]))
    enc, dec = sessions
    return (lambda: torch.from_numpy(enc.run(None, {"x": x.numpy()})[0][:, :4].copy()),
            lambda: torch.from_numpy(dec.run(None, {"x": z.numpy()})[0]))


def _runner(name: str, x: torch.Tensor, z: torch.Tensor, threads: int, tmp: str):
    """(encode fn, decode fn, scope) of one contender: each fn returns float32 (1, 4, h, w) / (1, 3, H, W)."""
    import contextlib

    import kl_autoencoder as ka

    vae = ka.create("sd-kl-f8", seed=0).eval()  # random but fixed weights
    if name.startswith("ours"):
        if name == "ours_bf16":
            vae = vae.to(torch.bfloat16)  # what ka.load(path, dtype="bf16") does after loading
        vae = ka.optimize_inference(vae)
        latents = ka.normalize_latents(vae, z)
        return (lambda: ka.encode_moments(vae, x)[0], lambda: ka.decode(vae, latents), torch.inference_mode)
    if name in ("plain", "diffusers_bf16"):
        dt = torch.bfloat16 if name == "diffusers_bf16" else torch.float32
        vae = vae.to(dt)
        xd, zd = x.to(dt), z.to(dt)
        return (lambda: vae.encode(xd).latent_dist.mean.float(), lambda: vae.decode(zd).sample.float(), torch.no_grad)
    if name.startswith("openvino"):
        enc, dec = _openvino(vae, x, z, threads, name == "openvino_default", tmp)
        return enc, dec, contextlib.nullcontext
    if name == "onnxruntime":
        enc, dec = _onnxruntime(vae, x, z, threads, tmp)
        return enc, dec, contextlib.nullcontext
    if name == "torch_compile":
        enc, dec = torch.compile(_Encoder(vae)), torch.compile(_Decoder(vae))
        return (lambda: enc(x)[:, :4], lambda: dec(z), torch.no_grad)
    raise ValueError(name)


def _worker(conn, name: str, x: torch.Tensor, z: torch.Tensor, threads: int) -> None:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            enc, dec, scope = _runner(name, x, z, threads, tmp)
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            conn.send(f"{type(e).__name__}: {e}")
            return
        conn.send("ready")
        fns = {"enc": enc, "dec": dec}
        while (op := conn.recv()) is not None:
            with scope():
                c0, t0 = own_cpu_seconds(), time.perf_counter()
                out = fns[op]()
                wall, cpu = time.perf_counter() - t0, own_cpu_seconds() - c0
            conn.send((wall, cpu, out.float()))


def _available(name: str) -> str | None:
    """None if the contender can run, else why not."""
    module = CONTENDERS[name][1]
    if module and importlib.util.find_spec(module) is None:
        return f"{module} not installed (pip install {module}{' onnx' if module == 'onnxruntime' else ''})"
    return None


def bench_size(size: int, names: list[str], repeats: int, threads: int) -> dict:
    import multiprocessing as mp

    import kl_autoencoder as ka
    from kl_autoencoder.evaluation.metrics import psnr

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, size, size, generator=g) * 2 - 1  # (1, 3, S, S) in [-1, 1]
    with torch.no_grad():
        z = ka.create("sd-kl-f8", seed=0).encode(x).latent_dist.mean  # (1, 4, S/8, S/8) raw latent
    ctx = mp.get_context("spawn")
    procs = {}
    for name in names:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, name, x, z, threads), daemon=True)
        p.start()
        procs[name] = (parent, p)
    live = []
    for name in names:  # setups ran in parallel; wait for each
        msg = procs[name][0].recv()
        if msg == "ready":
            live.append(name)
        else:
            print(f"  {name}: skipped, setup failed: {msg}", flush=True)
            procs[name][1].join()

    def call(name: str, op: str):
        p0, c0 = busy_seconds(), own_cpu_seconds()
        try:
            procs[name][0].send(op)
            wall, cpu, out = procs[name][0].recv()
        except (BrokenPipeError, EOFError, ConnectionResetError):  # the contender died: the kernel's OOM killer, say
            code = procs[name][1].exitcode
            print(f"  {name}: died (exit code {code}{', killed: out of memory?' if code == -9 else ''}); "
                  "left out from here on", flush=True)
            live.remove(name)
            return None
        others = busy_seconds() - p0 - cpu - (own_cpu_seconds() - c0)
        return wall, cpu, max(others, 0.0), out

    res: dict = {}
    for op in ("enc", "dec"):  # warm-up: compilation, weight packing, oneDNN primitive creation
        for name in list(live):
            got = call(name, op)
            if got:
                print(f"  {size}px {name} {op} warm-up: {got[0]:.2f} s", flush=True)
    for r in range(repeats):
        for op in ("enc", "dec"):
            for name in list(live):
                got = call(name, op)
                if got is None:
                    continue
                wall, cpu, others, out = got
                res.setdefault((name, op), []).append((wall, cpu, others, out))
                print(f"  {size}px repeat {r + 1}/{repeats} {name} {op}: {wall:.2f} s wall, {cpu:.2f} s CPU, "
                      f"others {others:.2f} CPU s", flush=True)
    for name in live:
        procs[name][0].send(None)
        procs[name][1].join()
    rows = {}
    for (name, op), calls in res.items():
        wall, cpu, others, out = min(calls, key=lambda c: c[0])
        ref = min(res[("plain", op)], key=lambda c: c[0])[3] if ("plain", op) in res else None
        err = float((out - ref).abs().max()) if ref is not None else math.nan
        db = psnr(out, ref) if ref is not None and op == "dec" else math.nan
        rows[(name, op)] = {"wall": wall, "cpu": cpu, "others": others, "max_others": max(c[2] for c in calls),
                            "err": err, "psnr": db}
    return rows


def _table(size: int, rows: dict, names: list[str]) -> str:
    plain = {op: rows.get(("plain", op), {}).get("wall") for op in ("enc", "dec")}
    lines = [f"\n{size} px (best of the repeats; wall s (CPU s) [others' CPU s in that call, max over repeats]; "
             "x = plain / contender; max abs error vs plain; decode PSNR vs plain)",
             "| contender | encode | decode | encode err | decode err (PSNR) |", "|---|---|---|---|---|"]
    for name in names:
        cells = []
        for op in ("enc", "dec"):
            r = rows.get((name, op))
            if r is None:
                cells.append("skipped")
                continue
            ratio = f" = {plain[op] / r['wall']:.2f}x" if plain[op] else ""
            cells.append(f"{r['wall']:.2f} ({r['cpu']:.2f}){ratio} [{r['others']:.2f}, {r['max_others']:.2f}]")
        e, d = rows.get((name, "enc")), rows.get((name, "dec"))
        errs = [f"{e['err']:.1e}" if e else "-", f"{d['err']:.1e} ({d['psnr']:.1f} dB)" if d else "-"]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {errs[0]} | {errs[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes, px (default 256 512)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per contender and op (default 5)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads per contender")
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    args = ap.parse_args(argv)
    names = []
    for name in args.contenders:
        why = _available(name)
        if why:
            print(f"{name}: skipped, {why}")
        else:
            names.append(name)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    print(f"machine: {platform.processor() or platform.machine()} ({', '.join(isa) or 'no AVX-512'}), {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} threads per contender")
    for name in names:
        print(f"  {name}: {CONTENDERS[name][0]}")
    last = {}
    for size in sorted(args.sizes):
        last = bench_size(size, names, args.repeats, args.threads)
        print(_table(size, last, names), flush=True)

    def ratio(a: str, b: str, op: str) -> float:
        return last[(a, op)]["wall"] / last[(b, op)]["wall"] if (a, op) in last and (b, op) in last else math.nan

    print(f"decode_fp32_vs_plain={ratio('plain', 'ours_fp32', 'dec'):.2f} encode_fp32_vs_plain={ratio('plain', 'ours_fp32', 'enc'):.2f} "
          f"decode_bf16_vs_openvino={ratio('openvino_default', 'ours_bf16', 'dec'):.2f} "
          f"encode_bf16_vs_openvino={ratio('openvino_default', 'ours_bf16', 'enc'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
