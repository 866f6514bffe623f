"""Evaluation items: FreebaseQA questions and multiple-choice sets (ARC, CommonsenseQA, MMLU)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent_prune.data.sources import hub_dataset, local_file, read_csv_rows, read_jsonl
from agent_prune.errors import InputError


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answers: tuple[str, ...]  # aliases, lowercased


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


FREEBASEQA_FILE = "freebaseqa/freebaseqa_dev.jsonl"
MC_FILES = {
    "arc_easy": "mc/arc_easy_validation.jsonl",
    "arc_challenge": "mc/arc_challenge_validation.jsonl",
    "csqa": "mc/csqa_dev.jsonl",
    "mmlu": "mc/mmlu_dev",
}
MC_HUB = {  # name, config, split
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "validation"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "validation"),
    "csqa": ("tau/commonsense_qa", None, "validation"),
    "mmlu": ("cais/mmlu", "all", "dev"),
}


def freebaseqa_items(data_dir: Path | None, limit: int | None = None) -> list[QAItem]:
    """FreebaseQA dev questions in file order (the first ``limit``)."""
    if data_dir is None:
        items = [_freebaseqa_from_hub(row) for row in hub_dataset("freebase_qa", split="validation")]
    else:
        items = [
            QAItem(str(r["id"]), r["question"], tuple(a.lower() for a in r["answers"]))
            for r in read_jsonl(local_file(data_dir, FREEBASEQA_FILE))
        ]
    return items[:limit] if limit is not None else items


def _freebaseqa_from_hub(row: dict) -> QAItem:
    names: list[str] = []
    for parse in row["Parses"]["Answers"]:
        for group in parse["AnswersName"]:
            names.extend(group)
    return QAItem(row["Question-ID"], row["RawQuestion"], tuple(dict.fromkeys(n.lower() for n in names)))


def choice_items(task: str, data_dir: Path | None, limit: int | None = None) -> list[ChoiceItem]:
    if task not in MC_FILES:
        raise InputError(f"unknown multiple-choice task '{task}'", f"use one of {', '.join(MC_FILES)}")
    if data_dir is None:
        name, config, split = MC_HUB[task]
        rows = list(hub_dataset(name, config, split=split))
        items = [_mmlu_item(r, i) if task == "mmlu" else _labelled_item(_flatten_hub_choices(r))
                 for i, r in enumerate(rows)]
    elif task == "mmlu":
        folder = local_file(data_dir, MC_FILES[task])
        items = []
        for path in sorted(folder.glob("*.csv")):
            for i, row in enumerate(read_csv_rows(path)):
                items.append(ChoiceItem(
                    f"{path.stem}-{i}", row["question"],
                    tuple(row[f"choice{k}"] for k in range(4)), int(row["answer"]),
                ))
    else:
        items = [_labelled_item(r) for r in read_jsonl(local_file(data_dir, MC_FILES[task]))]
    return items[:limit] if limit is not None else items


def _labelled_item(row: dict) -> ChoiceItem:
    labels = [str(label) for label in row["labels"]]
    key = str(row["answerKey"])
    if key not in labels:
        raise InputError(f"item {row.get('id')} has answer key {key} not among its labels",
                         "the data file is corrupt; restore it")
    return ChoiceItem(str(row["id"]), row["question"], tuple(row["choices"]), labels.index(key))


def _flatten_hub_choices(row: dict) -> dict:
    """Hub ARC/CSQA rows keep choices as {"text": [...], "label": [...]}."""
    return {"id": row["id"], "question": row["question"], "choices": row["choices"]["text"],
            "labels": row["choices"]["label"], "answerKey": row["answerKey"]}


def _mmlu_item(row: dict, index: int) -> ChoiceItem:
    return ChoiceItem(f"{row.get('subject', 'mmlu')}-{index}", row["question"],
                      tuple(row["choices"]), int(row["answer"]))
