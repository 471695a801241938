"""Image classification end to end through ``shoulders train`` on a local Ray: 2 workers, tiny checkpoints built
here, the image-folder layout and a Hugging Face ``save_to_disk`` dataset (Arrow files with image structs); the
export's test accuracy is reproduced by plain ``transformers`` in a process where shoulders cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import tiny_vision
from cluster.cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]
LABELS = ["red", "green", "blue"]


def run_job(tmp_path, name: str, raw: dict) -> dict:
    raw = {"name": name, "output": {"dir": str(tmp_path / name)}, "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}, **raw}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    return json.loads((tmp_path / name / "metrics.json").read_text())


CLEAN_ACCURACY = """
import json, pathlib, sys
sys.modules.update(engine=None, cluster=None)  # shoulders cannot be imported here
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification
folder, test = sys.argv[1], pathlib.Path(sys.argv[2])
processor = AutoImageProcessor.from_pretrained(folder)
model = AutoModelForImageClassification.from_pretrained(folder).eval()
paths = sorted(test.glob("*/*.png"))
with torch.no_grad():
    logits = model(**processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")).logits
right = [model.config.id2label[i] == p.parent.name for i, p in zip(logits.argmax(-1).tolist(), paths)]
print(json.dumps({"accuracy": sum(right) / len(right)}))
"""


def test_image_folder_trains_and_the_export_reproduces_its_test_accuracy(ray_local, tmp_path):
    folders = tiny_vision.write_colour_images(tmp_path / "colours", per_class=12, layout="folder")
    model = tiny_vision.save_tiny_image_model("convnext", tmp_path / "convnext")
    metrics = run_job(tmp_path, "folder", {
        "model": {"name": str(model), "task": "image_classification", "labels": LABELS},
        "data": {"train": str(folders["train"]), "validation": str(folders["validation"]), "test": str(folders["test"]), "rows_per_block": 8},
        "finetune": {"strategy": "full", "head_lr": 1e-2, "backbone_lr_ratio": 0.3},
        "optim": {"epochs": 3, "batch_size": 8},
    })
    assert metrics["test"]["accuracy"] >= 0.8  # 3 colours: chance is 0.33
    export = tmp_path / "folder" / "model"
    done = subprocess.run([sys.executable, "-I", "-c", CLEAN_ACCURACY, str(export), str(folders["test"])], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)


def test_a_hugging_face_image_dataset_in_arrow_files_trains(ray_local, tmp_path):
    import datasets
    import pyarrow.parquet as pq

    parquet = tiny_vision.write_colour_images(tmp_path / "colours", per_class=12)
    for split in ("train", "validation"):
        table = pq.read_table(parquet[split]).to_pydict()
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=LABELS)})
        rows = {"image": [{"bytes": b, "path": None} for b in table["image"]], "label": [LABELS.index(x) for x in table["label"]]}
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf" / split))
    model = tiny_vision.save_tiny_image_model("resnet", tmp_path / "resnet")
    metrics = run_job(tmp_path, "arrow", {
        "model": {"name": str(model), "task": "image_classification"},  # the class names come from the ClassLabel feature
        "data": {"train": {"hf_disk": str(tmp_path / "hf" / "train")}, "validation": {"hf_disk": str(tmp_path / "hf" / "validation")},
                 "rows_per_block": 8},
        "finetune": {"strategy": "full", "head_lr": 1e-2, "backbone_lr_ratio": 1.0},
        "optim": {"epochs": 4, "batch_size": 8},
    })
    assert metrics["best_validation"]["val_accuracy"] >= 0.8, metrics["best_validation"]
    assert json.loads((tmp_path / "arrow" / "model" / "config.json").read_text())["id2label"] == {"0": "red", "1": "green", "2": "blue"}
