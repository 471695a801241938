"""Finding the stack of transformer blocks in any Hugging Face architecture."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockStack:
    """The repeated transformer blocks of a model.

    Attributes:
        path: dotted module path of the ``nn.ModuleList`` (``bert.encoder.layer``, ``model.layers``).
        blocks: the blocks, bottom (input side) first.
    """

    path: str
    blocks: nn.ModuleList

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def attribute(self) -> str:
        """Last component of the path: what PEFT calls ``layers_pattern``."""
        return self.path.rsplit(".", 1)[-1]

    def prefix(self, index: int) -> str:
        """Parameter-name prefix of block ``index``."""
        return f"{self.path}.{index}."


def find_block_stack(model: nn.Module, prefer: str | None = None) -> BlockStack:
    """Return the main stack of transformer blocks of ``model``.

    The stack is the ``nn.ModuleList`` of identical modules holding the most parameters (BERT
    ``encoder.layer``, GPT-2 ``transformer.h``, Llama/Qwen2 ``model.layers``, ...). Encoder-decoder
    models have two stacks; ``prefer`` (a substring of the path such as ``encoder``) picks one.

    Raises:
        ValueError: the model has no such list.
    """
    candidates: list[tuple[int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if prefer and prefer not in name:
            continue
        size = sum(p.numel() for p in module.parameters())
        candidates.append((size, name, module))
    if not candidates:
        raise ValueError(f"could not find a stack of transformer blocks in {type(model).__name__}")
    _, name, module = max(candidates, key=lambda c: c[0])
    return BlockStack(path=name, blocks=module)


def resolve_freeze_depth(freeze_depth: int | str | None, depth: int) -> int:
    """Number of bottom blocks to freeze, from the job's ``freeze_depth`` (int, ``all``, negative, or None)."""
    if freeze_depth is None:
        return 0
    if freeze_depth == "all":
        return depth
    value = int(freeze_depth)
    if value < 0:
        return max(depth + value, 0)
    if value > depth:
        raise ValueError(f"finetune.freeze_depth is {value} but the model has only {depth} blocks: use 0..{depth} or 'all'")
    return value
