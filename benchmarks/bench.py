"""The engine against the best peer, side by side on the same machine, in one invocation.

Runs, each in its own process so that peak memory and failures stay separate:

* ``peers``: ``shared/bench/peer_baseline.py`` (HF Trainer + PEFT + Liger, speech loops, ...), unchanged;
* ``engine_ray``: the 1B-shape LoRA job through ``shoulders train``'s own path (preflight, Ray Data read +
  tokenize + stream, Ray Train ``TorchTrainer``, the engine's loop) with the engine's default perf settings;
* ``engine_plain``: the same model, settings and step without Ray (the Ray-overhead reference) + a profile;
* ``engine_plain_alt``: the same with FP8 flipped (off on GPUs, on (emulated) on CPU): FP8's share and the
  FP8-vs-bf16 loss parity on the same batches;
* ``engine_chat``: instruction tuning, the same model, LoRA and step without Ray on chat rows (``data.layout:
  chat``, a chat template, labels on the answers only, packed), the rows encoded as ``shoulders train`` does;
* ``engine_whisper_full`` / ``engine_w2v2_ctc`` (+ ``_<variant>``): the engine's step (perf + backend) on the peer's
  speech shapes, once per ``perf`` variant of ``SPEECH_VARIANTS``;
* ``engine_whisper_full_ray`` / ``engine_w2v2_ctc_ray``: the same shapes through ``shoulders train``'s path, the
  audio (wav bytes in parquet) decoded and featurised by Ray Data with the checkpoint's feature extractor;
* ``deepspeed``: ``benchmarks/deepspeed_gpu_check.py`` when it exists (GPU only).

Writes ``bench-<card>.json`` (card, versions, every job and result, targets and ratios) and prints a table.

    python -m benchmarks.bench --tiny --out /tmp/bench      # CPU smoke (tiny shapes, CI)
    python -m benchmarks.bench --out $OUT --mb 16            # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.workload import chat_job, lm_job, peer_script, speech_job, write_chat_workload, write_lm_workload, write_speech_workload

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"lora_speedup": 1.4, "speech_speedup": 1.5, "ray_overhead_pct": 2.0}
SPEECH_VARIANTS = {
    "base": {},  # the defaults: fp32 trainable weights under bf16 autocast
    "bf16w": {"trainable_weights_in_compute_dtype": True},  # bf16 weights, fp32 masters, no autocast
    "bf16w_compile": {"trainable_weights_in_compute_dtype": True, "compile": True},
}
"""Engine ``perf`` settings timed on each speech shape (``--speech-variants``); the best one is compared."""
LORA_PEERS = ("hf_lora", "hf_lora_liger", "loop_lora", "ds_lora", "loop_fast", "loop_fast_compile")


def versions() -> dict[str, Any]:
    """Card and library versions of this machine."""
    import importlib.metadata as md

    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    for name in ("torch", "transformers", "peft", "ray", "liger-kernel", "triton", "deepspeed", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        out["card"] = torch.cuda.get_device_name()
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["cuda"] = torch.version.cuda
    else:
        out["card"] = "cpu"
    return out


def run_process(cmd: list[str], timeout: int, env: dict[str, str] | None = None, log: Path | None = None) -> tuple[int, str]:
    """Run ``cmd`` with a hard timeout; returns (exit code, output). Output is echoed and kept in ``log``."""
    t0 = time.perf_counter()
    # A session of its own, so a case that runs over its time is killed with everything it started (Ray too).
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        code, text = 124, (text or "") + f"\n(killed after {timeout}s)"
    if log:
        log.write_text(text)
    print(f"# {' '.join(cmd[1:4])} ... exit {code} in {time.perf_counter() - t0:.0f}s", flush=True)
    return code, text


def run_peers(cases: str, args: argparse.Namespace, env: dict[str, str], work: Path) -> list[dict[str, Any]]:
    """``peer_baseline.py`` as it is; its ``RESULT {json}`` lines are the peer rows."""
    cmd = [sys.executable, str(peer_script()), "--cases", cases, "--steps", str(args.warm + args.steps), "--warm", str(args.warm), "--mb", str(args.mb)]
    if args.tiny:
        cmd.append("--tiny")
    peer_env = {k: v for k, v in env.items() if k != "OUT"}  # its anchor.json is not needed: rows are parsed here
    code, text = run_process(cmd, args.timeout, peer_env, work / "peers.log")
    rows = [json.loads(line[len("RESULT "):]) for line in text.splitlines() if line.startswith("RESULT ")]
    if not rows:
        rows = [{"case": "peers", "error": f"exit {code}: {text[-600:]}"}]
    for row in rows:
        row["source"] = "peer_baseline.py"
    return rows


def run_engine(name: str, mode: str, job: dict[str, Any], args: argparse.Namespace, env: dict[str, str], work: Path, profile: bool = False) -> dict[str, Any]:
    """One ``benchmarks.run_engine`` case in its own process."""
    job_file, out_file = work / f"{name}.job.json", work / f"{name}.result.json"
    job_file.write_text(json.dumps(job, indent=1))
    out_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.run_engine", "--mode", mode, "--job", str(job_file), "--out", str(out_file),
           "--warm", str(args.warm), "--steps", str(args.steps)] + (["--profile"] if profile else []) + (["--tiny"] if args.tiny else [])
    code, text = run_process(cmd, args.timeout, env, work / f"{name}.log")
    if code != 0 or not out_file.is_file():
        return {"case": name, "error": f"exit {code}: {text[-1500:]}", "job": job}
    return {"case": name, **json.loads(out_file.read_text()), "job": job}


def speech_ray_variant(requested: str | None, rows: list[dict[str, Any]], speech: str, gpu: bool) -> str:
    """The ``perf`` variant of a speech shape's row through ``shoulders train``: the one asked for, else the
    fastest variant timed without Ray in this run, else ``bf16w`` on a GPU and ``base`` on CPU."""
    if requested:
        return requested
    timed = [r for r in rows if re.fullmatch(f"engine_{speech}(_.+)?", r.get("case", "")) and r.get("samples_per_s") and r.get("variant")]
    return max(timed, key=lambda r: r["samples_per_s"])["variant"] if timed else ("bf16w" if gpu else "base")


def best(rows: list[dict[str, Any]], names: tuple[str, ...], key: str) -> dict[str, Any] | None:
    candidates = [r for r in rows if r.get("case") in names and key in r]
    return max(candidates, key=lambda r: r[key]) if candidates else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios against the targets, each with whether it was met and by how much it was missed."""
    by = {r["case"]: r for r in rows}
    out: dict[str, Any] = {}
    peer = best(rows, LORA_PEERS, "tokens_per_s")
    engine = by.get("engine_ray")
    if peer and engine and "tokens_per_s" in engine:
        ratio = engine["tokens_per_s"] / peer["tokens_per_s"]
        mem_ok = engine.get("peak_mem_gib") is None or peer.get("peak_mem_gib") is None or engine["peak_mem_gib"] <= peer["peak_mem_gib"]
        out["lora_speedup"] = {"best_peer": peer["case"], "peer_tokens_per_s": peer["tokens_per_s"], "engine_tokens_per_s": round(engine["tokens_per_s"]),
                               "ratio": round(ratio, 3), "target": TARGETS["lora_speedup"], "met": ratio >= TARGETS["lora_speedup"] and mem_ok,
                               "peer_peak_mem_gib": peer.get("peak_mem_gib"), "engine_peak_mem_gib": engine.get("peak_mem_gib"), "memory_ok": mem_ok,
                               "short_by_pct": round(max(0.0, 100 * (TARGETS["lora_speedup"] - ratio) / TARGETS["lora_speedup"]), 1)}
    plain = by.get("engine_plain")
    if engine and plain and "tokens_per_s" in engine and "tokens_per_s" in plain:
        overhead = 100 * (1 - engine["tokens_per_s"] / plain["tokens_per_s"])
        out["ray_overhead_pct"] = {"ray_tokens_per_s": round(engine["tokens_per_s"]), "plain_tokens_per_s": round(plain["tokens_per_s"]),
                                   "overhead_pct": round(overhead, 2), "target": TARGETS["ray_overhead_pct"], "met": overhead <= TARGETS["ray_overhead_pct"]}
    alt = by.get("engine_plain_alt")
    if plain and alt and plain.get("train_loss") and alt.get("train_loss"):
        fp8_row, bf16_row = (plain, alt) if plain.get("perf_plan", {}).get("fp8") else (alt, plain)
        diffs = [abs(a - b) / abs(b) for a, b in zip(fp8_row["train_loss"], bf16_row["train_loss"])]
        out["fp8_parity"] = {"max_rel_loss_diff": round(max(diffs), 5), "fp8_loss": fp8_row["train_loss"], "bf16_loss": bf16_row["train_loss"],
                             "fp8_tokens_per_s": round(fp8_row.get("tokens_per_s", 0)), "bf16_tokens_per_s": round(bf16_row.get("tokens_per_s", 0))}
    for speech in ("whisper_full", "w2v2_ctc"):
        peer_sps = by.get(speech, {}).get("samples_per_s")
        variants = [r for name, r in by.items() if re.fullmatch(f"engine_{speech}(_.+)?", name) and r.get("samples_per_s")]
        fastest = max(variants, key=lambda r: r["samples_per_s"], default=None)
        if peer_sps and fastest:
            ratio = fastest["samples_per_s"] / peer_sps
            out[f"{speech}_speedup"] = {"peer_samples_per_s": peer_sps, "engine_samples_per_s": round(fastest["samples_per_s"], 1), "ratio": round(ratio, 3),
                                        "engine_case": fastest["case"], "target": TARGETS["speech_speedup"], "met": ratio >= TARGETS["speech_speedup"],
                                        "short_by_pct": round(max(0.0, 100 * (TARGETS["speech_speedup"] - ratio) / TARGETS["speech_speedup"]), 1),
                                        "engine_peak_mem_gib": fastest.get("peak_mem_gib"), "peer_peak_mem_gib": by[speech].get("peak_mem_gib")}
        ray_row = by.get(f"engine_{speech}_ray", {})
        variant = ray_row.get("variant")
        plain_row = by.get(f"engine_{speech}" + ("" if variant in (None, "base") else f"_{variant}"), {})
        if ray_row.get("samples_per_s") and plain_row.get("samples_per_s"):
            out[f"{speech}_ray_overhead_pct"] = {"variant": variant, "ray_samples_per_s": round(ray_row["samples_per_s"], 1),
                                                 "plain_samples_per_s": round(plain_row["samples_per_s"], 1),
                                                 "overhead_pct": round(100 * (1 - ray_row["samples_per_s"] / plain_row["samples_per_s"]), 2)}
        if peer_sps and not fastest:
            out[f"{speech}_speedup"] = {"peer_samples_per_s": peer_sps, "target": TARGETS["speech_speedup"], "met": False,
                                        "note": "engine speech row not measured in this run"}
    return out


def fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and value else "-"


def profile_note(profile: dict[str, Any] | None) -> str:
    """A row's kernel profile in one line: GPU ms per step, then the largest kinds."""
    if not profile:
        return ""
    kinds = sorted(profile["ms_per_step_by_kind"].items(), key=lambda kv: -kv[1])
    return f"GPU {profile['gpu_ms_per_step']:.0f} ms/step: " + ", ".join(f"{k.split(' ')[0]} {v:.0f}" for k, v in kinds[:4] if v)


def table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The short table printed last: one line per case, then each target."""
    lines = [f"{'case':<34}{'tokens/s':>11}{'samples/s':>11}{'MFU %':>8}{'peak GiB':>10}  note"]
    for r in rows:
        note = (r.get("error") or "").strip().splitlines()[-1][:70] if r.get("error") else profile_note(r.get("profile"))
        lines.append(f"{r['case']:<34}{fmt(r.get('tokens_per_s'), ',.0f'):>11}{fmt(r.get('samples_per_s'), ',.1f'):>11}"
                     f"{fmt(r.get('mfu_pct'), '.1f'):>8}{fmt(r.get('peak_mem_gib'), '.1f'):>10}  {note}")
    for key, s in summary.items():
        if key == "fp8_parity":
            lines.append(f"fp8 parity: max relative loss difference {s['max_rel_loss_diff']}; "
                         f"fp8 {s['fp8_tokens_per_s']:,} vs bf16 {s['bf16_tokens_per_s']:,} tokens/s")
            continue
        keys = ("ratio", "overhead_pct", "target", "met", "best_peer", "engine_case", "variant", "memory_ok", "short_by_pct", "note",
                "peer_samples_per_s")
        lines.append(f"{key}: {({k: v for k, v in s.items() if k in keys})}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: a smoke test of every case, not a measurement")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    parser.add_argument("--work", default=None, help="scratch folder for the model, data and logs (default: a temporary one)")
    parser.add_argument("--mb", type=int, default=16, help="micro-batch of the peer and the engine (LoRA case)")
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--peer-cases", default=None, help="peer_baseline.py cases (default: best peer + speech on GPU, loop_lora on CPU)")
    parser.add_argument("--cases", default="peers,engine_ray,engine_plain,engine_plain_alt,engine_chat,engine_whisper_full,engine_w2v2_ctc,"
                        "engine_whisper_full_ray,engine_w2v2_ctc_ray,deepspeed")
    parser.add_argument("--speech-variants", default=None,
                        help=f"engine perf variants per speech shape, of {','.join(SPEECH_VARIANTS)} (default: all on GPU, base on CPU)")
    parser.add_argument("--speech-ray-variant", default=None, help="perf variant of the speech rows through shoulders train (default: the fastest one timed without Ray)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per case")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    work = Path(args.work or tempfile.mkdtemp(prefix="shoulders-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if args.tiny:
        env.setdefault("OMP_NUM_THREADS", "1")  # CPU smoke: one thread per process, as Ray's workers have
    env.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="sb-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    cases = args.cases.split(",")
    t0 = time.perf_counter()
    info = versions()
    print("machine", json.dumps(info), flush=True)
    rows: list[dict[str, Any]] = []

    workload = write_lm_workload(work / "lm", args.tiny, args.mb if not args.tiny else 2, args.warm + args.steps)
    job = lm_job(workload, work / "runs" / "engine", args.warm, args.steps, gpu)
    if "peers" in cases:
        default_peers = "hf_lora_liger,whisper_full,w2v2_ctc" if gpu else "loop_lora"
        rows += run_peers(args.peer_cases or default_peers, args, env, work)
        save(rows, info, workload, args, out, t0)
    alt = json.loads(json.dumps(job))
    alt["perf"]["fp8_frozen"] = "off" if gpu else "on"
    plain = alt_row = None
    if "engine_plain" in cases:
        plain = run_engine("engine_plain", "plain", job, args, env, work, profile=gpu)
        rows.append(plain)
        save(rows, info, workload, args, out, t0)
    if "engine_plain_alt" in cases:
        alt_row = run_engine("engine_plain_alt", "plain", alt, args, env, work)
        rows.append(alt_row)
        save(rows, info, workload, args, out, t0)
    if "engine_chat" in cases:  # instruction tuning: the same LoRA step on chat rows, loss on the answers only
        chat = chat_job(write_chat_workload(workload), work / "runs" / "chat", args.warm, args.steps, gpu)
        rows.append(run_engine("engine_chat", "plain", chat, args, env, work))
        save(rows, info, workload, args, out, t0)
    if "engine_ray" in cases:
        # If the default settings crashed without Ray and the alternative ran, measure Ray with that one.
        fallback = plain is not None and "error" in plain and alt_row is not None and "error" not in alt_row
        rows.append(run_engine("engine_ray", "ray", alt if fallback else job, args, env, work))
        if fallback:
            rows[-1]["note"] = "default perf settings failed without Ray; this row uses engine_plain_alt's"
        save(rows, info, workload, args, out, t0)
    variants = (args.speech_variants or (",".join(SPEECH_VARIANTS) if gpu else "base")).split(",")
    for speech in ("whisper_full", "w2v2_ctc"):
        for variant in variants if f"engine_{speech}" in cases else []:
            name = f"engine_{speech}" + ("" if variant == "base" else f"_{variant}")
            rows.append({**run_engine(name, speech, {"perf": SPEECH_VARIANTS[variant]}, args, env, work, profile=gpu), "variant": variant})
            save(rows, info, workload, args, out, t0)
        if f"engine_{speech}_ray" in cases:  # the same shape through shoulders train: Ray Data decodes and featurises the audio
            variant = speech_ray_variant(args.speech_ray_variant, rows, speech, gpu)
            speech_work = write_speech_workload(work / speech, speech, args.tiny, args.warm + args.steps)
            job_dict = speech_job(speech_work, work / "runs" / speech, args.warm, args.steps, gpu, SPEECH_VARIANTS[variant])
            rows.append({**run_engine(f"engine_{speech}_ray", "ray", job_dict, args, env, work), "variant": variant})
            save(rows, info, workload, args, out, t0)
    ds_check = ROOT / "benchmarks" / "deepspeed_gpu_check.py"
    if "deepspeed" in cases and gpu and ds_check.is_file():
        code, text = run_process([sys.executable, str(ds_check)], min(args.timeout, 150), env, work / "deepspeed.log")
        rows.append({"case": "deepspeed_gpu_check", "exit_code": code, "output_tail": text[-1500:]})

    path = save(rows, info, workload, args, out, t0)
    print(f"wrote {path}")
    print(table(rows, summarize(rows)))
    return 0


def save(rows: list[dict[str, Any]], info: dict[str, Any], workload: dict[str, Any], args: argparse.Namespace, out: Path, t0: float) -> Path:
    """Write the JSON (after every case, so a run cut short still leaves what it measured)."""
    card = re.sub(r"[^A-Za-z0-9]+", "-", info["card"]).strip("-").lower()
    result = {"machine": info, "mode": "tiny-cpu-smoke" if args.tiny else "full", "micro_batch": workload["micro_batch"],
              "seq": workload["seq"], "warm_steps": args.warm, "timed_steps": args.steps, "flops_per_token": workload["flops_per_token"],
              "params_compute": workload["params_compute"], "model_config": workload["model_config"], "targets": TARGETS,
              "summary": summarize(rows), "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    path = out / f"bench-{card}{'-tiny' if args.tiny else ''}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
