"""``shoulders env`` (and ``shoulders --version``): what the engine sees, one line each.

Versions come from the installed packages' metadata and build records; torch and DeepSpeed are never imported
(each takes seconds; DeepSpeed picks an accelerator and may JIT-compile), so the command answers in well under
a second. The devices are the NVIDIA driver's; DeepSpeed's prebuilt ops come from the build record it installs
(``deepspeed/git_version_info_installed.py``), the JIT-compiled ones from torch's extensions cache.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cluster


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def shoulders_line() -> str:
    """The engine's version and where it is imported from."""
    where = Path(cluster.__file__).resolve().parent.parent
    return f"shoulders {package_version('shoulders') or '(not installed)'} ({where}, Python {sys.version.split()[0]})"


def module_constants(package: str, module: str, names: tuple[str, ...]) -> dict[str, object]:
    """Literal assignments ``names`` of ``package/module`` (a build record such as ``torch/version.py``), read
    without importing the package (importing torch or DeepSpeed takes seconds and may compile)."""
    spec = importlib.util.find_spec(package)
    found: dict[str, object] = {}
    if spec is None or not spec.submodule_search_locations:
        return found
    try:
        tree = ast.parse((Path(next(iter(spec.submodule_search_locations))) / module).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return found
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target if isinstance(node, ast.AnnAssign) else None
        if getattr(target, "id", None) in names and node.value is not None:
            try:
                found[target.id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return found


def nvidia_gpus() -> list[str]:
    """The NVIDIA GPUs the driver lists (``/proc/driver/nvidia/gpus``), then ``nvidia-smi -L``; empty without a driver."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                names.append(line.split(":", 1)[1].strip())
    if names or shutil.which("nvidia-smi") is None:
        return names
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=2).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split(":", 1)[1].split("(UUID")[0].strip() for line in out.splitlines() if line.startswith("GPU ")]


def torch_lines() -> list[str]:
    """torch's version and build (CUDA or CPU), and the devices a worker could train on."""
    build = module_constants("torch", "version.py", ("__version__", "cuda"))
    if not build:
        return ["torch: not installed (pip install torch; see the README's install section)"]
    cuda = build.get("cuda")
    lines = [f"torch {build.get('__version__')} ({f'CUDA {cuda} build' if cuda else 'CPU build'})"]
    gpus = nvidia_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f"; CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ""
    if gpus and cuda:
        lines.append(f"devices: {len(gpus)} NVIDIA GPU(s): {', '.join(gpus)}{shown} (scaling.use_gpu auto trains on them)")
    elif gpus:
        lines.append(f"devices: {len(gpus)} NVIDIA GPU(s): {', '.join(gpus)}, but torch is a CPU build: install a CUDA build to use them")
    else:
        lines.append(f"devices: CPU only, {os.cpu_count()} cores (no NVIDIA GPU visible)")
    return lines


def deepspeed_ops() -> tuple[list[str], list[str]]:
    """DeepSpeed's prebuilt ops (its installed build record) and those JIT-compiled into torch's extensions cache."""
    installed = module_constants("deepspeed", "git_version_info_installed.py", ("installed_ops",)).get("installed_ops")
    built = sorted(op for op, on in installed.items() if on) if isinstance(installed, dict) else []
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    jit = sorted({so.parent.name for so in cache.glob("*/*/*.so")} | {so.parent.name for so in cache.glob("*/*.so")})
    return built, jit


def deepspeed_line() -> str:
    """DeepSpeed's version and which of its ops are compiled (none compiled means a JIT compile on first use)."""
    version = package_version("deepspeed")
    if version is None:
        return "DeepSpeed: not installed (backend.name deepspeed needs it)"
    built, jit = deepspeed_ops()
    ops = f"prebuilt ops: {', '.join(built) or 'none'}; JIT-compiled in the extensions cache: {', '.join(jit) or 'none'}"
    return f"DeepSpeed {version} ({ops})"


def hub_line() -> str:
    """The Hugging Face cache folder models are looked up in, and whether the hub is reachable by policy."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    mode = "offline (HF_HUB_OFFLINE=1): models load from this cache or a local folder" if offline else "online: hub ids download into it"
    return f"Hugging Face cache: {constants.HF_HUB_CACHE} ({mode})"


def env_lines() -> list[str]:
    """Every line ``shoulders env`` prints."""
    lines = [shoulders_line(), *torch_lines()]
    lines.append(f"Ray {package_version('ray') or 'not installed'}")
    lines.append(deepspeed_line())
    for name in ("transformers", "peft"):
        lines.append(f"{name} {package_version(name) or 'not installed'}")
    lines.append(hub_line())
    return lines


def print_env() -> None:
    """Print :func:`env_lines`."""
    print("\n".join(env_lines()))
