"""The driver's peak memory against the model's size: `shoulders train` on two BERTs ~10x apart in parameters.

The driver of a cluster job runs on the head node; it must hold nothing model-sized (the export, the LoRA merge and
the test evaluation run in a Ray task on a worker's resources, :mod:`cluster.run.export_task`). This runs the same
job on a BERT of 10.7M and one of 85M parameters (~8x) (random weights, the tests' word tokenizer),
each `shoulders train` in its own process with an embedded Ray, and reads that process's own peak RSS
(``VmHWM``; Ray's and the workers' processes are not counted). Not ``ru_maxrss``: Linux carries it over ``exec``
from the forking parent, so a child of this script, which built the larger model, would start at this script's
peak. Prints a table and writes JSON.

    python -m benchmarks.driver_memory --out benchmarks/results/cpu-2core
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"small": dict(hidden_size=384, num_hidden_layers=6, intermediate_size=1536),   # ~10.7M parameters, 41 MiB
         "large": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072)}  # ~85M parameters, 325 MiB
DRIVER = textwrap.dedent(
    """
    import json, sys
    from cluster.cli.main import main
    code = main(sys.argv[1:])
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("DRIVER-PEAK-KIB " + json.dumps(int(peak.split()[1])))
    sys.exit(code)
    """
)


def save_model(folder: Path, size: dict) -> int:
    """A BERT of ``size`` with the tests' word tokenizer and a 512-word vocabulary; returns its parameter count."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    tokenizer = tiny.tiny_tokenizer(folder)
    config = transformers.BertConfig(vocab_size=len(tokenizer), num_attention_heads=4, max_position_embeddings=64, **size)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(name: str, model: Path, data: dict, root: Path) -> dict:
    job = root / f"{name}.yaml"
    job.write_text(textwrap.dedent(f"""\
        name: driver-{name}
        model: {{name: {model}, labels: [food, sport, tech]}}
        data: {{train: {data['train']}, validation: {data['validation']}, test: {data['test']}, max_length: 16}}
        finetune: {{strategy: full}}
        optim: {{max_steps: 4, batch_size: 8}}
        scaling: {{num_workers: 1, cpus_per_worker: 1}}
        output: {{dir: "{root}/out/{{name}}"}}
        """))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", DRIVER, "train", str(job)], env=env, capture_output=True, text=True, cwd=root, timeout=1200, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name}: shoulders train failed\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    peak_kib = json.loads(done.stdout.split("DRIVER-PEAK-KIB ")[1].splitlines()[0])
    metrics = json.loads((root / "out" / f"driver-{name}" / "metrics.json").read_text())
    export = root / "out" / f"driver-{name}" / "model"
    return {"driver_peak_rss_mib": round(peak_kib / 1024, 1), "export_mib": round(sum(f.stat().st_size for f in export.rglob("*") if f.is_file()) / 2**20, 1),
            "test_accuracy": metrics["test"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cpu-2core")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    rows = {}
    with tempfile.TemporaryDirectory(prefix="driver-memory-") as tmp:
        root = Path(tmp)
        data = tiny.write_topic_data(root / "data", rows=96)
        for name, size in SIZES.items():
            params = save_model(root / name, size)
            rows[name] = {"parameters": params, **run(name, root / name, data, root)}
    small, large = rows["small"], rows["large"]
    import platform
    from importlib.metadata import version

    result = {"rows": rows, "parameter_ratio": round(large["parameters"] / small["parameters"], 1),
              "driver_peak_growth": round(large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"] - 1, 4),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "versions": {name: version(name) for name in ("torch", "transformers", "ray")},
              "config": {"sizes": SIZES, "job": "max_steps 4, batch 8, max_length 16, 1 worker x 1 CPU, 96 train rows, "
                                                "export merged to output.dir, test split evaluated"}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "driver_memory.json").write_text(json.dumps(result, indent=1))
    print(f"{'model':<6} {'parameters':>11} {'export MiB':>10} {'driver peak RSS MiB':>20}")
    for name, row in rows.items():
        print(f"{name:<6} {row['parameters']:>11,} {row['export_mib']:>10} {row['driver_peak_rss_mib']:>20}")
    print(f"{result['parameter_ratio']}x the parameters: driver peak RSS {100 * result['driver_peak_growth']:+.1f} %")


if __name__ == "__main__":
    main()
