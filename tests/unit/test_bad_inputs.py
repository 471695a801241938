"""Every bad input of the corpus (``tests/unit/bad_inputs.py``) is refused before any worker starts: exit code
2, one message naming the key, file, row or column, no traceback, nothing written, Ray never started, and
each answer in well under a few seconds."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from bad_inputs import CASES, Ctx
from cluster.cli.main import main


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.fixture
def ctx(tmp_path, tiny_bert, tiny_llama_lm, tiny_wav2vec2, topic_data, monkeypatch) -> Ctx:
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = tmp_path / "case"
    root.mkdir()
    data = {}
    for split, path in topic_data.items():
        data[split] = root / "data" / Path(path).name
        (shutil.copytree if Path(path).is_dir() else shutil.copy)(path, data[split])
    return Ctx(root=root, model=tiny_bert, lm_model=tiny_llama_lm, speech_model=tiny_wav2vec2, data=data)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_before_any_worker(name, ctx, capsys):
    argv, expected = CASES[name](ctx)
    before = files_under(ctx.root)
    started = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    elapsed = time.perf_counter() - started
    out, err = capsys.readouterr()
    text = out + err
    assert code == 2, f"exit {code} for {name}:\n{text}"
    assert "Traceback" not in text
    missing = [e for e in expected if e not in text]
    assert not missing, f"the error does not name {missing}:\n{text}"
    assert files_under(ctx.root) == before, "a refused job wrote files"
    assert elapsed < 5.0, f"{name} took {elapsed:.1f} s"


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out + err


def as_validate(argv: list[str]) -> list[str] | None:
    """The ``validate`` command line that checks what ``argv`` (a train or tune command) would run, or None."""
    if argv[0] == "train":
        return ["validate", *argv[1:]]
    if argv[0] == "tune":
        return ["validate", "--tune", *argv[1:]]
    return None


@pytest.mark.parametrize("name", sorted(CASES))
def test_validate_refuses_what_train_and_tune_refuse(name, ctx, capsys):
    """``validate`` is the preflight: every case ``train`` or ``tune`` refuses, it refuses with the same message."""
    argv, _ = CASES[name](ctx)
    validate = as_validate(argv)
    if validate is None:
        pytest.skip(f"{argv[0]} is not train or tune")
    code, text = run_cli(argv, capsys)
    assert code == 2, text
    v_code, v_text = run_cli(validate, capsys)
    assert v_code == 2, f"validate said exit {v_code} where {argv[0]} refused:\n{v_text}\n--- {argv[0]}:\n{text}"
    errors = [line for line in text.splitlines() if line.startswith("error") or line.startswith("  - ")]
    assert errors and errors == [line for line in v_text.splitlines() if line.startswith("error") or line.startswith("  - ")], (text, v_text)
