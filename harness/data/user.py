"""A user's own datasets, declared in the YAML (`data.datasets`), become registry entries: no code edits.

A declaration names a local file (CSV, JSON, JSONL, Parquet) or a hub dataset (id, split, subset, revision) and
maps the user's columns to the row fields of its kind. From then on the name works wherever a registry name
does (`data.harmful.sources`, `data.finetune.datasets`, `data.procedures`), through the same loaders: the same
checks for corrupt files and missing columns, the same `data.bad_rows` handling, the same checksums recorded on
every run (a file's sha256; a hub set's commit).

A fine-tuning set is either instruction/input/response columns or chat `messages` (one user turn and the
assistant's reply, as TRL's conversational format writes them); a procedure set (title + steps) is rendered in
Study B's formats exactly like WikiHow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from harness.config import USER_DATASET_FIELDS, UserDatasetConfig
from harness.data.registry import (BadRow, DatasetError, DatasetSpec, FinetuneRow, HarmfulPrompt, MissingColumn,
                                   Procedure, Record, RowFn, _first, _text, declare, parse_steps)


def declare_user_datasets(datasets: Mapping[str, UserDatasetConfig]) -> None:
    """Make the YAML's `data.datasets` nameable by the loaders (replacing an earlier study's)."""
    declare([user_spec(name, settings) for name, settings in datasets.items()])


def user_spec(name: str, settings: UserDatasetConfig) -> DatasetSpec:
    """The registry entry for one declared dataset."""
    where = f"data.datasets.{name}"
    field_of = {field: settings.columns.get(field, field) for field in USER_DATASET_FIELDS[settings.kind]}
    to_row = _ROW_FUNCTIONS[settings.kind](name, field_of, settings.columns)
    if settings.path is not None:
        path = settings.path.expanduser().absolute()
        return DatasetSpec(name, settings.kind, None, (str(path),), to_row, columns=(_required(settings),),
                           declared_as=where)
    return DatasetSpec(name, settings.kind, settings.hub, (), to_row, hub_split=settings.split,
                       hub_subset=settings.subset, hub_revision=settings.revision, declared_as=where)


def _required(settings: UserDatasetConfig) -> tuple[str, ...]:
    """The columns every record of a declared file must have; checked up front, so a wrong mapping is one line
    naming the file and the column. A fine-tuning set without a mapping may be either shape: its rows say."""
    columns = settings.columns
    if settings.kind == "harmful":
        return (columns.get("prompt", "prompt"), *([columns["category"]] if "category" in columns else []))
    if settings.kind == "procedures":
        return (columns.get("title", "title"), columns.get("steps", "steps"))
    if "messages" in columns:
        return (columns["messages"],)
    if {"instruction", "response"} & set(columns):
        return (columns.get("instruction", "instruction"), columns.get("response", "response"))
    return ()


def _harmful_rows(name: str, field_of: dict[str, str], mapped: dict[str, str]) -> RowFn:
    """A prompt per record; its category is the mapped column, else the dataset's name."""

    def to_row(record: Record, origin: str) -> HarmfulPrompt:
        category = _text(_first(record, field_of["category"])) if "category" in mapped else name
        return HarmfulPrompt(prompt=_text(_first(record, field_of["prompt"])), category=category, source=name)

    return to_row


def _finetune_rows(name: str, field_of: dict[str, str], mapped: dict[str, str]) -> RowFn:
    """An example per record: chat `messages` when mapped (or, unmapped, when the record has them and no
    instruction column), else instruction/input/response."""
    chat_column = field_of["messages"]

    def to_row(record: Record, origin: str) -> FinetuneRow:
        chat = "messages" in mapped or ("instruction" not in mapped and field_of["instruction"] not in record
                                        and chat_column in record)
        meta = {"file": origin, "dataset": name}
        if chat:
            instruction, response = chat_pair(_first(record, chat_column))
            return FinetuneRow(instruction=instruction, input="", response=response, meta=meta)
        try:
            instruction = _text(_first(record, field_of["instruction"]))
            response = _text(_first(record, field_of["response"]))
        except MissingColumn as error:
            raise MissingColumn(f"{error} — map your columns under data.datasets.{name}.columns (instruction, "
                                f"response, input; or messages for chat turns)") from None
        return FinetuneRow(instruction=instruction, input=_text(record.get(field_of["input"])), response=response,
                           meta=meta)

    return to_row


def chat_pair(messages: Any) -> tuple[str, str]:
    """(user turn, assistant reply) of a one-exchange chat: a list of {role, content} turns (or its JSON text, as a
    CSV holds it). A fine-tune here learns one reply to one instruction; a longer conversation or a system turn is
    an error naming the record, never cut silently."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise BadRow("messages is text that is not a JSON list of turns") from None
    if not isinstance(messages, list) or not all(isinstance(turn, Mapping) for turn in messages):
        raise BadRow(f"messages is a {type(messages).__name__}, not a list of {{role, content}} turns")
    roles = [str(turn.get("role", "")) for turn in messages]
    if roles != ["user", "assistant"]:
        raise DatasetError(f"messages has the turns {roles or 'none'}; a fine-tuning example is one user turn and "
                           "the assistant's reply (no system turn, no longer conversation)")
    return _text(messages[0].get("content")), _text(messages[1].get("content"))


def _procedure_rows(name: str, field_of: dict[str, str], mapped: dict[str, str]) -> RowFn:
    """A procedure per record: steps as a list of strings, or as numbered lines (parsed like WikiHow's)."""

    def to_row(record: Record, origin: str) -> Procedure:
        steps = _first(record, field_of["steps"])
        if isinstance(steps, list):
            steps = [" ".join(_text(step).split()) for step in steps]
            steps = [step for step in steps if step]
        else:
            steps = parse_steps(_text(steps))
        return Procedure(title=" ".join(_text(_first(record, field_of["title"])).split()), steps=steps)

    return to_row


_ROW_FUNCTIONS = {"harmful": _harmful_rows, "finetune": _finetune_rows, "procedures": _procedure_rows}
