"""The package's layout: layers import one way, argparse only in cli/, the public surface kept, the wheel whole."""

from __future__ import annotations

import argparse
import ast
import functools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kl_autoencoder as ka
from kl_autoencoder.cli import build_parser

PACKAGE = Path(ka.__file__).resolve().parent
# The layer order of the package docstring: a module may import its own layer and those before it.
LAYERS = [
    {"errors", "settings", "utils", "config", "samples"},
    {"model"},
    {"convert"},
    {"inference"},
    {"latents"},
    {"evaluation"},
    {"training"},
    {"pipelines"},
    {"cli"},
]
# Every name `import kl_autoencoder as ka` exported before the subpackages (2026-11 layout change).
PUBLIC_NAMES = [
    "evaluate", "interpolate", "slerp", "score_images", "elbo_bits_per_dim", "optimize_inference", "Fp16Report",
    "IncompatibleVAEError", "SwapReport", "check_fp16", "load_file", "save_ldm", "swap_vae", "BucketBatchSampler",
    "LatentDataset", "LatentStats", "LatentTransform", "compute_latent_stats", "encode_dataset", "make_buckets", "Config",
    "ConfigError", "ImageError", "check_latents", "create", "decode", "denormalize_latents", "encode", "encode_moments",
    "export", "list_presets", "load", "load_config", "load_image", "normalize_latents", "num_parameters", "psnr",
    "reconstruct", "to_pil", "to_uint8",
]
SUBCOMMANDS = ["check-fp16", "convert", "decode", "demo", "encode", "eval", "export", "interpolate", "reconstruct",
               "score", "stats", "swap", "train"]


@functools.lru_cache(maxsize=1)
def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(["kl_autoencoder", *parts])] = f
    return out


def _imports(name: str, path: Path) -> list[str]:
    """Absolute names of every kl_autoencoder module ``name`` imports, at any depth of the file (lazy imports too)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("kl_autoencoder"):
                subs = [f"{mod}.{a.name}" for a in node.names]
                if not all(sub in _modules() for sub in subs):  # `from . import common` needs only the submodule
                    found.append(mod)
                found += subs
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("kl_autoencoder")]
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if m != "kl_autoencoder" and _layer(m) is None]
    assert not missing, f"modules outside the layer table: {missing}"


def test_imports_run_one_way():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        if name == "kl_autoencoder":
            continue  # the package itself re-exports the API
        for target in _imports(name, path):
            if target == "kl_autoencoder" and _layer(name) != 0:
                continue  # `from .. import __version__` / `settings`
            lt = _layer(target)
            if lt is not None and lt > _layer(name):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(wrong)


def test_no_import_circles():
    modules = _modules()
    graph = {m: {t for t in _imports(m, p) if t in modules and t != m} for m, p in modules.items()}
    # `from .. import settings` names the root package, which re-exports the API: only its submodule counts
    graph = {m: ts - {"kl_autoencoder"} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle.extend(stack[stack.index(t):] + [t] if t in stack else [m, t])
                return True
            if state.get(t) is None and visit(t, stack + [t]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, [m]):
            break
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_argparse_and_cli_only_in_cli():
    bad = []
    for name, path in _modules().items():
        if name.startswith("kl_autoencoder.cli"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "argparse" or n.startswith("argparse.") for n in names):
                bad.append(f"{name} imports argparse")
        if any(t.startswith("kl_autoencoder.cli") for t in _imports(name, path)):
            bad.append(f"{name} imports cli")
    assert not bad, bad


def test_cli_imports_every_command_module_explicitly():
    import importlib

    cli_main = importlib.import_module("kl_autoencoder.cli.main")  # `kl_autoencoder.cli.main` is also the function
    commands = {p.stem for p in (PACKAGE / "cli").glob("*.py")} - {"__init__", "__main__", "main", "common"}
    registered = {m.__name__.rsplit(".", 1)[-1] for m in cli_main.COMMANDS}
    assert registered == commands
    assert "importlib" not in (PACKAGE / "cli" / "main.py").read_text()


def test_public_names_kept():
    missing = [n for n in PUBLIC_NAMES if not hasattr(ka, n)]
    assert not missing, missing
    assert set(PUBLIC_NAMES) <= set(ka.__all__)
    assert callable(ka.evaluate) and callable(ka.interpolate)  # functions, not modules of the same name


def test_every_subcommand_kept_with_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == SUBCOMMANDS
    r = subprocess.run([sys.executable, "-m", "kl_autoencoder.cli", "encode", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "kl-autoencoder encode" in r.stdout


def test_wheel_holds_every_subpackage_and_the_presets(tmp_path):
    root = PACKAGE.parent
    if not (root / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                        str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(root)) for p in PACKAGE.rglob("__init__.py")}
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"subpackages missing from the wheel: {missing}"
    presets = {f"kl_autoencoder/configs/{p.name}" for p in (root / "configs").glob("*.yaml")}
    assert presets and presets <= names
    assert not any(n.startswith("tests/") for n in names)
