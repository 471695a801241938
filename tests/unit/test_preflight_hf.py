"""Splits given as Hugging Face datasets (a hub id served offline from the local ``datasets`` cache, a
``save_to_disk`` folder): checked before any worker starts, each failure one line naming the key and the fix.
No Ray: the end-to-end run is in ``tests/ray/test_instruct.py``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import tiny_chat
from cluster.preflight.data import check_data
from engine.config.schema import build_job
from engine.errors import JobError

REPO = "shoulders-test/colour-chat"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The tiny chat model's tokenizer, the chat splits in the session's datasets cache as ``REPO`` and in a save_to_disk folder."""
    root = tmp_path_factory.mktemp("hf-sources")
    data = tiny_chat.write_instruction_data(root / "data")
    splits = {"train": data["chat_train"], "validation": data["chat_validation"]}
    tiny_chat.chat_tokenizer(root / "model")  # the data checks read only its chat template: no weights needed
    return {
        "model": root / "model",
        "repo": tiny_chat.save_to_datasets_cache(REPO, splits),
        "disk": tiny_chat.save_to_disk(root / "disk", splits),
        "data": data,
    }


def chat_job(sources, train, **data):
    return build_job({"model": {"name": str(sources["model"]), "task": "causal_lm"}, "data": {"train": train, "layout": "chat", **data}})


def test_a_hub_id_offline_and_a_save_to_disk_split_are_read_from_their_arrow_files(sources):
    info = check_data(chat_job(sources, {"hf": REPO, "split": "train"}, validation={"hf_disk": str(sources["disk"]), "split": "validation"}))
    train, validation = info.splits["train"], info.splits["validation"]
    assert (train.num_rows, validation.num_rows) == (96, 12)  # as written by write_instruction_data
    assert train.format == validation.format == "arrow" and train.columns == ["messages"]
    assert train.files[0].endswith("colour-chat-train.arrow") and "shoulders-test___colour-chat" in train.files[0]
    assert validation.files == [str(sources["disk"] / "validation" / "data-00000-of-00001.arrow")]
    # the first rows as the workers and the generation samples see them: the jsonl rows, in order
    from cluster.ingest.rows import iter_column

    first = next(iter_column(train.files, train.format, "messages"))
    assert first == json.loads(sources["data"]["chat_train"].read_text().splitlines()[0])["messages"]
    # the forgetting probe's retention set reads the same files (the first validation chats, as text)
    from engine.safeguards.guards import read_retention_texts

    job = chat_job(sources, {"hf": REPO, "split": "train"}, validation={"hf_disk": str(sources["disk"]), "split": "validation"})
    texts = read_retention_texts(job, {s.name: (s.files, s.format) for s in info.splits.values()})
    chats = [json.loads(line)["messages"] for line in sources["data"]["chat_validation"].read_text().splitlines()]
    assert texts == ["\n".join(m["content"] for m in chat) for chat in chats]


def test_an_unknown_hub_id_names_the_key_the_cache_and_the_fix(sources):
    with pytest.raises(JobError, match=r"^data.train.hf: dataset 'shoulders-test/nope' was not found in the local datasets cache .*"
                                       r"HF_HUB_OFFLINE=1 .*Fix the id") as caught:
        check_data(chat_job(sources, {"hf": "shoulders-test/nope", "split": "train"}))
    assert "\n" not in str(caught.value)


def test_a_missing_split_or_config_names_the_key_and_the_splits_there_are(sources):
    with pytest.raises(JobError, match=r"^data.validation.split: hub dataset '.*colour-chat' split 'dev' does not exist: .*'train', 'validation'"):
        check_data(chat_job(sources, {"hf": REPO, "split": "train"}, validation={"hf": REPO, "split": "dev"}))
    with pytest.raises(JobError, match=r"^data.train.config: .*config 'x'.*Available configs in the cache: \['default'\]"):
        check_data(chat_job(sources, {"hf": REPO, "split": "train", "config": "x"}))
    disk = str(sources["disk"])
    with pytest.raises(JobError, match=r"^data.train.split: '.*' has no split 'dev'; its splits are train, validation. Set data.train.split"):
        check_data(chat_job(sources, {"hf_disk": disk, "split": "dev"}))
    with pytest.raises(JobError, match=r"^data.train.split: '.*' holds several splits; its splits are train, validation"):
        check_data(chat_job(sources, {"hf_disk": disk}))
    with pytest.raises(JobError, match=r"^data.train.split: '.*train' holds one dataset, not splits .*Remove data.train.split"):
        check_data(chat_job(sources, {"hf_disk": f"{disk}/train", "split": "train"}))


def test_a_folder_that_is_missing_or_not_a_save_to_disk_folder_is_named(sources, tmp_path):
    with pytest.raises(JobError, match=r"^data.train.hf_disk: folder '.*nope' does not exist"):
        check_data(chat_job(sources, {"hf_disk": str(tmp_path / "nope")}))
    with pytest.raises(JobError, match=r"^data.train.hf_disk: '.*' is not a folder written by datasets' save_to_disk"):
        check_data(chat_job(sources, {"hf_disk": str(tmp_path)}))


def test_a_missing_column_names_the_layout_key_and_the_columns_there_are(sources):
    job = build_job({"model": {"name": str(sources["model"]), "task": "causal_lm"},
                     "data": {"train": {"hf": REPO, "split": "train"}, "layout": "prompt_completion"}})
    with pytest.raises(JobError, match=r"^data.train: column 'prompt' \(data.prompt_column\) is not in hub dataset '.*colour-chat' "
                                       r"split 'train'; its columns are \['messages'\]. Set data.prompt_column"):
        check_data(job)
    with pytest.raises(JobError, match=r"column 'conversations' \(data.messages_column\) is not in save_to_disk folder"):
        check_data(chat_job(sources, {"hf_disk": str(sources["disk"]), "split": "train"}, messages_column="conversations"))


def test_the_row_checks_apply_to_a_dataset_split(sources, tmp_path):
    import datasets

    rows = [{"prompt": "what colour is sky", "completion": "blue"}, {"prompt": "what colour is snow", "completion": " "}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "pc"))
    job = build_job({"model": {"name": str(sources["model"]), "task": "causal_lm"},
                     "data": {"train": {"hf_disk": str(tmp_path / "pc")}, "layout": "prompt_completion"}})
    with pytest.raises(JobError, match=r"^data.train row 1: column 'completion' \(data.completion_column\) is empty"):
        check_data(job)
    datasets.Dataset.from_list([{"text": "a"}, {"text": None}]).save_to_disk(str(tmp_path / "text"))
    text = build_job({"model": {"name": str(sources["model"]), "task": "causal_lm"}, "data": {"train": {"hf_disk": str(tmp_path / "text")}}})
    with pytest.raises(JobError, match=r"^data.train: file '.*data-00000-of-00001.arrow', row 2 .*column 'text' is empty"):
        check_data(text)


def test_the_schema_takes_a_path_or_one_dataset_mapping():
    def errors(train) -> str:
        with pytest.raises(JobError) as caught:
            build_job({"model": {"name": "m"}, "data": {"train": train}})
        return str(caught.value)

    assert "'data.train': hf 'org/x' needs a split, e.g. split: train" in errors({"hf": "org/x"})
    assert "give exactly one of hf (a hub dataset id) and hf_disk" in errors({"hf": "org/x", "hf_disk": "d", "split": "train"})
    assert "slices and split arithmetic are not supported" in errors({"hf": "org/x", "split": "train[:10]"})
    assert "unknown key 'data.train.colums'. Valid keys here: config, hf, hf_disk, revision, split." in errors({"hf_disk": "d", "colums": 1})
    assert "config and revision apply to hf" in errors({"hf_disk": "d", "config": "c"})
    job = build_job({"model": {"name": "m"}, "data": {"train": "t.jsonl", "validation": {"hf": "org/x", "split": "validation", "config": "en"}}})
    assert job.data.train == "t.jsonl" and job.data.validation.config == "en"


def test_submit_packs_a_save_to_disk_folder_and_leaves_a_hub_id_to_the_cluster_cache(sources):
    from cluster.remote.submit import plan_package

    job = chat_job(sources, {"hf": REPO, "split": "train"}, validation={"hf_disk": str(sources["disk"]), "split": "validation"})
    package = plan_package(job)
    assert package.job.data.train.hf == REPO
    assert package.job.data.validation.hf_disk == "inputs/data.validation" and package.job.data.validation.split == "validation"
    assert package.files["inputs/data.validation/dataset_dict.json"] == sources["disk"] / "dataset_dict.json"
    assert "inputs/data.validation/validation/data-00000-of-00001.arrow" in package.files


def test_dataset_preflight_imports_no_torch_and_no_ray(sources):
    code = (f"import sys; from cluster.preflight.job import check_data; from engine.config.schema import build_job; "
            f"check_data(build_job({{'model': {{'name': {str(sources['model'])!r}, 'task': 'causal_lm'}}, "
            f"'data': {{'train': {{'hf': {REPO!r}, 'split': 'train'}}, 'layout': 'chat'}}}})); "
            "assert not {'torch', 'ray'} & set(sys.modules), 'torch or ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    """A Hugging Face dataset whose label column is a ClassLabel (integers 0/1 naming 'neg'/'pos'), saved with
    save_to_disk and as parquet by datasets itself; its test split marks unlabelled rows -1, as GLUE's do."""
    import datasets

    root = tmp_path_factory.mktemp("hf-classlabel")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = {"text": [f"{word} film number {i}" for i, word in enumerate(["awful", "great"] * 12)], "label": [0, 1] * 12}
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows, features=features),
        "validation": datasets.Dataset.from_dict({k: v[:6] for k, v in rows.items()}, features=features),
        "test": datasets.Dataset.from_dict({"text": ["unrated film"] * 4, "label": [-1] * 4}, features=features),
    })
    splits.save_to_disk(str(root / "disk"))
    splits["train"].to_parquet(str(root / "train.parquet"))
    splits["validation"].to_parquet(str(root / "validation.parquet"))
    return root


def classify_job(model, train, validation, labels=None, **data):
    return build_job({"model": {"name": str(model), **({"labels": labels} if labels else {})},
                      "data": {"train": train, "validation": validation, **data}})


def test_class_label_names_are_the_classes_whether_read_from_disk_or_parquet(sentiment, tiny_bert):
    disk = str(sentiment / "disk")
    info = check_data(classify_job(tiny_bert, {"hf_disk": disk, "split": "train"}, {"hf_disk": disk, "split": "validation"}))
    assert info.labels == ["neg", "pos"]  # not ['0', '1']: the exported model's id2label names the classes
    info = check_data(classify_job(tiny_bert, str(sentiment / "train.parquet"), str(sentiment / "validation.parquet")))
    assert info.labels == ["neg", "pos"]
    # the job's own labels win (and the integers index them)
    info = check_data(classify_job(tiny_bert, str(sentiment / "train.parquet"), str(sentiment / "validation.parquet"),
                                   labels=["negative", "positive"]))
    assert info.labels == ["negative", "positive"]


def test_an_unlabelled_test_split_names_minus_one_and_where_the_classes_came_from(sentiment, tiny_bert):
    disk = str(sentiment / "disk")
    job = classify_job(tiny_bert, {"hf_disk": disk, "split": "train"}, {"hf_disk": disk, "split": "validation"},
                       test={"hf_disk": disk, "split": "test"})
    with pytest.raises(JobError, match=r"^data.test: column 'label' holds labels the job does not declare: \['-1'\] \(-1 is how "
                                       r"Hugging Face datasets mark an unlabelled row.*\['neg', 'pos'\], from the ClassLabel names"):
        check_data(job)
