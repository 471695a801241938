"""Image classification without Ray: decoding and RGB conversion, the checkpoint's processor, seeded
augmentation, the refusal of a size or normalisation that contradicts the checkpoint, freeze depth counted in
blocks or stages (exact trainable sets), frozen batch norms, and an export that plain ``transformers``
reproduces in a process where shoulders is not importable."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_vision
from engine.config.schema import build_job
from engine.errors import JobError
from engine.models.prepare import prepare_model
from engine.preprocessing.image import ImageError, augment_batch, decode_image
from engine.tasks import get_task

LABELS = ["red", "green", "blue"]
TASK = get_task("image_classification")


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    return tiny_vision.save_tiny_image_model("vit", tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> Path:
    return tiny_vision.save_tiny_image_model("resnet", tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="module")
def convnext(tmp_path_factory) -> Path:
    return tiny_vision.save_tiny_image_model("convnext", tmp_path_factory.mktemp("convnext"))


def image_job(model: Path, **data) -> object:
    return build_job({"model": {"name": str(model), "task": "image_classification", "labels": LABELS},
                      "data": {"train": "unused.parquet", **data}})


def png(mode: str, size: tuple[int, int] = (10, 6)) -> bytes:
    from PIL import Image

    colour = {"L": 128, "RGBA": (255, 0, 0, 0), "RGB": (1, 2, 3), "P": 3, "I;16": 40000}[mode]
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_grayscale_rgba_palette_and_16_bit_images_become_rgb():
    for mode in ("L", "RGBA", "RGB", "P", "I;16"):
        image = decode_image(png(mode))
        assert image.mode == "RGB" and image.size == (10, 6), mode
    assert decode_image(png("L")).getpixel((0, 0)) == (128, 128, 128)
    assert decode_image(png("RGBA")).getpixel((0, 0)) == (255, 255, 255)  # fully transparent: the white background


def test_an_unreadable_or_empty_image_is_refused_naming_it(tmp_path):
    with pytest.raises(ImageError, match="cannot be decoded"):
        decode_image(b"not a png at all")
    with pytest.raises(ImageError, match="truncated|cannot be decoded"):
        decode_image(png("RGB", (64, 64))[:60])
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png' is empty \(0 bytes\)"):
        decode_image("empty.png", base_dir=str(tmp_path))
    with pytest.raises(ImageError, match="missing.png"):
        decode_image(str(tmp_path / "missing.png"))


def test_the_checkpoints_processor_sets_size_and_normalisation(vit, convnext):
    batch = {"image": np.array([png("L"), png("RGB")], dtype=object), "label": np.array(["blue", "red"], dtype=object)}
    out = TASK.batch_preprocessor(image_job(vit), LABELS)(batch)
    assert out["pixel_values"].shape == (2, 3, tiny_vision.SIDE, tiny_vision.SIDE) and out["pixel_values"].dtype == np.float32
    assert out["labels"].tolist() == [2, 0]
    np.testing.assert_allclose(out["pixel_values"][0], (128 / 255 - 0.5) / 0.5, atol=1e-6)  # mean 0.5, std 0.5
    convnext_out = TASK.batch_preprocessor(image_job(convnext), LABELS)(batch)
    assert convnext_out["pixel_values"].shape[-2:] == (tiny_vision.SIDE, tiny_vision.SIDE)
    np.testing.assert_allclose(convnext_out["pixel_values"][0, 0], (128 / 255 - 0.485) / 0.229, atol=1e-5)
    resized = TASK.batch_preprocessor(image_job(vit, image_size=16, preprocessing_override=True), LABELS)(batch)
    assert resized["pixel_values"].shape == (2, 3, 16, 16)


def test_augmentation_is_seeded_and_keeps_the_shape():
    pixels = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    first = augment_batch(pixels, np.random.default_rng([7, 0, 1, 2]))
    again = augment_batch(pixels, np.random.default_rng([7, 0, 1, 2]))
    other = augment_batch(pixels, np.random.default_rng([7, 0, 1, 3]))
    assert first.shape == pixels.shape and first.dtype == pixels.dtype
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(augment_batch(pixels, np.random.default_rng(0), crop_scale=(1.0, 1.0), hflip=False), pixels)
    flipped = [augment_batch(pixels[:1], np.random.default_rng(s), crop_scale=None) for s in range(8)]
    assert any(np.array_equal(f, pixels[:1, :, :, ::-1]) for f in flipped) and any(np.array_equal(f, pixels[:1]) for f in flipped)


def test_augmentation_is_for_training_only_and_can_be_turned_off(vit):
    assert TASK.train_augmentation(image_job(vit)) is not None
    assert TASK.train_augmentation(image_job(vit, augment=False)) is None
    batch = {"image": np.array([png("RGB")] * 2, dtype=object), "label": np.array(["red", "red"], dtype=object)}
    once, twice = (TASK.batch_preprocessor(image_job(vit), LABELS)(batch) for _ in range(2))
    np.testing.assert_array_equal(once["pixel_values"], twice["pixel_values"])  # preprocessing itself draws nothing


@pytest.mark.parametrize(("key", "value", "ours", "theirs"), [
    ("image_size", 64, "64", "32"),
    ("image_mean", [0.485, 0.456, 0.406], "[0.485, 0.456, 0.406]", "[0.5, 0.5, 0.5]"),
    ("image_std", [0.2, 0.2, 0.2], "[0.2, 0.2, 0.2]", "[0.5, 0.5, 0.5]"),
])
def test_size_or_normalisation_contradicting_the_checkpoint_is_refused_naming_both(vit, key, value, ours, theirs):
    import re

    with pytest.raises(JobError, match=f"data.{key} is {re.escape(ours)} but the checkpoint .* pre-trained with {re.escape(theirs)}"):
        TASK.check_settings(image_job(vit, **{key: value}))
    TASK.check_settings(image_job(vit, **{key: value}, preprocessing_override=True))  # said explicitly: allowed
    TASK.check_settings(image_job(vit, image_size=tiny_vision.SIDE, image_mean=[0.5, 0.5, 0.5]))  # the checkpoint's own


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_freeze_depth_counts_vit_layers(vit):
    prepared = prepare_model(build_job({"model": {"name": str(vit), "task": "image_classification"}, "data": {"train": "x.parquet"},
                                        "finetune": {"freeze_depth": 1}}), LABELS)
    stack = prepared.stack.path
    assert stack in ("vit.layers", "vit.encoder.layer") and prepared.stack.depth == 2  # transformers 5.x / 4.x names
    names = trainable(prepared.model)
    everything = {n for n, _ in prepared.model.named_parameters()}
    assert names == {n for n in everything if not n.startswith(("vit.embeddings", f"{stack}.0."))}
    assert {n for n in names if n.startswith(f"{stack}.1.")} and {"classifier.weight", "vit.layernorm.weight"} <= names


@pytest.mark.parametrize(("kind", "path"), [("resnet", "resnet.encoder.stages"), ("convnext", "convnext.encoder.stages")])
def test_freeze_depth_counts_cnn_stages_and_a_linear_probe_trains_only_the_head(kind, path, request):
    model_dir = request.getfixturevalue(kind)
    job = build_job({"model": {"name": str(model_dir), "task": "image_classification"}, "data": {"train": "x.parquet"},
                     "finetune": {"freeze_depth": 1}})
    prepared = prepare_model(job, LABELS)
    assert prepared.stack.path == path and prepared.stack.depth == 2
    all_names = {n for n, _ in prepared.model.named_parameters()}
    assert trainable(prepared.model) == {n for n in all_names if not n.startswith(f"{kind}.embedder") and not n.startswith(f"{kind}.embeddings")
                                         and not n.startswith(f"{path}.0.")}
    probe = prepare_model(build_job({"model": {"name": str(model_dir), "task": "image_classification"}, "data": {"train": "x.parquet"},
                                     "finetune": {"strategy": "feature_extraction"}}), LABELS)
    assert trainable(probe.model) == {"classifier.weight", "classifier.bias"} if kind == "convnext" else {"classifier.1.weight", "classifier.1.bias"}


def test_frozen_batch_norms_keep_their_running_statistics(resnet):
    job = build_job({"model": {"name": str(resnet), "task": "image_classification"}, "data": {"train": "x.parquet"},
                     "finetune": {"freeze_depth": 1}})
    model = prepare_model(job, LABELS).model.train()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    before = {n: m.running_mean.clone() for n, m in norms.items()}
    model(pixel_values=torch.randn(4, 3, 32, 32) * 3 + 1)
    for name, norm in norms.items():
        frozen = not norm.weight.requires_grad
        assert torch.equal(norm.running_mean, before[name]) == frozen, name
    assert any(not m.weight.requires_grad for m in norms.values()) and any(m.weight.requires_grad for m in norms.values())


def test_lora_on_a_vit_trains_adapters_and_the_head(vit):
    job = build_job({"model": {"name": str(vit), "task": "image_classification"}, "data": {"train": "x.parquet"},
                     "finetune": {"strategy": "lora"}, "peft": {"target_modules": ["q_proj", "v_proj"], "r": 2}})
    names = trainable(prepare_model(job, LABELS).model)
    assert names and all("lora_" in n or "classifier" in n for n in names)
    assert any("classifier" in n for n in names) and sum("lora_A" in n for n in names) == 4  # 2 layers x query, value


CLEAN_SCRIPT = """
import io, json, sys
sys.modules.update(engine=None, cluster=None)  # shoulders cannot be imported here (the venv has it installed editable)
import numpy as np, pyarrow.parquet as pq, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification
folder, data = sys.argv[1], sys.argv[2]
processor = AutoImageProcessor.from_pretrained(folder)
model = AutoModelForImageClassification.from_pretrained(folder).eval()
images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pq.read_table(data).column("image").to_pylist()]
with torch.no_grad():
    logits = model(**processor(images=images, return_tensors="pt")).logits
print(json.dumps({"logits": logits.tolist(), "labels": [model.config.id2label[i] for i in logits.argmax(-1).tolist()]}))
"""


def test_the_export_reproduces_the_engines_predictions_with_plain_transformers(convnext, tmp_path):
    from engine.checkpoints.export import export_checkpoint
    from engine.checkpoints.store import save_checkpoint

    from test_export import WeightsOnly

    data = tiny_vision.write_colour_images(tmp_path / "data", per_class=4)
    job = build_job({"model": {"name": str(convnext), "task": "image_classification", "labels": LABELS},
                     "data": {"train": str(data["train"]), "image_size": 24, "preprocessing_override": True}})
    prepared = prepare_model(job, LABELS)
    with torch.no_grad():
        prepared.model.classifier.weight.normal_(0, 1.0)  # a head that separates the images
    folder = save_checkpoint(tmp_path / "checkpoint", backend=WeightsOnly(prepared.model), rank=0, world_size=1,
                             state={"train": {"step": 1}}, job=job.model_dump(mode="json"))
    out = export_checkpoint(folder, tmp_path / "model", LABELS)
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 24} and saved["image_mean"] == [0.485, 0.456, 0.406]  # as trained
    import pyarrow.parquet as pq

    table = pq.read_table(data["test"])
    batch = {"image": np.array(table.column("image").to_pylist(), dtype=object), "label": np.array(table.column("label").to_pylist(), dtype=object)}
    inputs = TASK.batch_preprocessor(job, LABELS)(batch)
    with torch.no_grad():
        engine_logits = prepared.model.eval()(pixel_values=torch.from_numpy(inputs["pixel_values"])).logits
    done = subprocess.run([sys.executable, "-I", "-c", CLEAN_SCRIPT, str(out), str(data["test"])], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    clean = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(clean["logits"]), engine_logits.numpy(), atol=1e-5)
    assert clean["labels"] == [LABELS[i] for i in engine_logits.argmax(-1).tolist()]
    assert len(set(clean["labels"])) > 1


def test_checkpoints_carry_the_running_statistics_of_trained_batch_norms(resnet):
    from engine.checkpoints.store import load_trainable_state, trainable_state_dict

    job = build_job({"model": {"name": str(resnet), "task": "image_classification"}, "data": {"train": "x.parquet"},
                     "finetune": {"freeze_depth": 1}})
    model = prepare_model(job, LABELS).model.train()
    model(pixel_values=torch.randn(4, 3, 32, 32) * 3 + 1)
    saved = trainable_state_dict(model)
    trained = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and m.weight.requires_grad}
    assert {k.rsplit(".", 1)[0] for k in saved if k.endswith("running_mean")} == trained  # frozen norms keep the checkpoint's
    fresh = prepare_model(job, LABELS).model
    load_trainable_state(fresh, saved)
    for name, buffer in model.named_buffers():
        assert torch.equal(dict(fresh.named_buffers())[name], buffer), name


def write_job(tmp_path: Path, model: Path, data: dict, **extra) -> Path:
    import yaml

    job = {"name": "vision", "model": {"name": str(model), "task": "image_classification", "labels": LABELS},
           "data": {"image_column": "image", **{k: str(v) for k, v in data.items()}, **extra}, "output": {"dir": str(tmp_path / "out")}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def validate(path: Path, capsys, *overrides: str) -> tuple[int, str]:
    from cluster.cli.main import main

    code = main(["validate", str(path), *overrides])
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture(scope="module")
def colour_parquet(tmp_path_factory) -> dict[str, Path]:
    data = tiny_vision.write_colour_images(tmp_path_factory.mktemp("colours"), per_class=4)
    return {"train": data["train"], "validation": data["validation"]}


def test_validate_refuses_a_size_or_normalisation_contradicting_the_checkpoint_with_exit_2(vit, colour_parquet, tmp_path, capsys):
    path = write_job(tmp_path, vit, colour_parquet)
    assert validate(path, capsys)[0] == 0
    code, text = validate(path, capsys, "data.image_size=64")
    assert code == 2 and "data.image_size is 64" in text and "pre-trained with 32" in text and "Traceback" not in text
    code, text = validate(path, capsys, "data.image_std=[0.2,0.2,0.2]")
    assert code == 2 and "data.image_std is [0.2, 0.2, 0.2]" in text and "[0.5, 0.5, 0.5]" in text
    assert validate(path, capsys, "data.image_size=64", "data.preprocessing_override=true")[0] == 0


def test_a_corrupt_image_in_the_sampled_rows_is_refused_naming_the_file(vit, colour_parquet, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(colour_parquet["train"])
    images = table.column("image").to_pylist()
    images[5] = b"\x89PNG\r\n\x1a\n not really"
    broken = tmp_path / "broken.parquet"
    pq.write_table(table.set_column(0, "image", pa.array(images, pa.binary())), broken)
    code, text = validate(write_job(tmp_path, vit, {**colour_parquet, "train": broken}), capsys)
    assert code == 2 and f"file '{broken}', row 6" in text and "not an image format Pillow reads" in text, text


def test_an_image_folder_is_read_with_labels_from_its_folders_and_a_zero_size_image_is_named(vit, tmp_path, capsys):
    folders = tiny_vision.write_colour_images(tmp_path / "folders", per_class=4, layout="folder")
    path = write_job(tmp_path, vit, {"train": folders["train"], "validation": folders["validation"]})
    code, text = validate(path, capsys)
    assert code == 0 and "train 12 rows, validation 6 rows" in text and "['red', 'green', 'blue']" in text, text
    empty = folders["train"] / "green" / "empty.png"
    empty.write_bytes(b"")
    code, text = validate(path, capsys)
    assert code == 2 and str(empty) in text and "is empty (0 bytes)" in text, text


def test_the_block_count_of_image_configs_is_what_freeze_depth_counts():
    from cluster.modalities.image import MODALITY

    assert MODALITY.block_count({"num_hidden_layers": 12}) == 12  # ViT, DINOv2
    assert MODALITY.block_count({"depths": [3, 4, 6, 3], "num_hidden_layers": 99}) == 4  # ResNet, ConvNeXt, Swin stages
    assert MODALITY.block_count({"num_block_repeats": [1, 2, 2, 3, 3, 4, 1], "depth_coefficient": 1.0, "num_hidden_layers": 64}) == 16


def test_a_corrupt_image_while_streaming_stops_the_run_naming_file_and_row(vit, colour_parquet, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.ingest.rows import BadRowError, RowRules, check_batch

    table = pq.read_table(colour_parquet["train"])
    images = table.column("image").to_pylist()
    images[9] = images[9][:40]  # a truncated PNG
    broken = tmp_path / "late.parquet"
    pq.write_table(table.set_column(0, "image", pa.array(images, pa.binary())), broken)
    rules = RowRules(split="train", label_column="label", labels=tuple(LABELS), other_columns=("image",), image_columns=("image",),
                     files=(str(broken),))
    batch = {"image": np.array(images, dtype=object), "label": np.array(table.column("label").to_pylist(), dtype=object),
             "path": np.array([str(broken)] * len(images), dtype=object)}
    with pytest.raises(BadRowError, match=rf"data.train: file '{broken}', row 10 .*column 'image': image '<40 bytes>' is not a readable image"):
        check_batch(dict(batch), rules)
    kept = check_batch(dict(batch), RowRules(**{**rules.__dict__, "skip": True}))
    assert len(kept["image"]) == len(images) - 1
