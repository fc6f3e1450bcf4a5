"""Issue 20, story 1: datasets declared in the YAML (`data.datasets`) load through the registry's loaders: local
CSV/JSON/JSONL/Parquet files with a column mapping, hub ids (offline: one line), chat messages, procedure sets
rendered in Study B's formats; every mistake is one line naming the YAML field or the file and record."""

import hashlib
import json

import pyarrow
import pyarrow.parquet
import pytest

from harness.config import parse_config
from harness.data import registry as data
from harness.data.user import declare_user_datasets
from harness.errors import HarnessError
from harness.study.runner import prepare_data


@pytest.fixture(autouse=True)
def no_declared_datasets():
    yield
    data.declare([])


def config(datasets: dict, **data_section):
    return parse_config({"name": "own", "model": "m", "data": {"datasets": datasets, **data_section}})


def declare(datasets: dict):
    declare_user_datasets(config(datasets).data.datasets)


def test_parquet_prompts_with_mapped_columns(tmp_path):
    path = tmp_path / "prompts.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"q": ["first prompt", "second prompt"], "cat": ["a", "b"]}), path)
    declare({"mine": {"kind": "harmful", "path": str(path), "columns": {"prompt": "q", "category": "cat"}}})
    assert data.load_harmful("mine") == [data.HarmfulPrompt("first prompt", "a", "mine"),
                                         data.HarmfulPrompt("second prompt", "b", "mine")]
    assert data.checksums("mine") == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()}


def test_unmapped_category_is_the_dataset_name_and_json_array_works(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "p1"}, {"prompt": "p2"}]))
    declare({"mine": {"kind": "harmful", "path": str(path)}})
    assert [(p.prompt, p.category) for p in data.load_harmful("mine")] == [("p1", "mine"), ("p2", "mine")]


def test_instruction_response_columns_and_chat_messages(tmp_path):
    (tmp_path / "pairs.csv").write_text("ask,context,answer\nDo this.,with that,Done.\n")
    chats = [[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]]
    pyarrow.parquet.write_table(pyarrow.table({"turns": chats}), tmp_path / "chat.parquet")
    declare({
        "pairs": {"kind": "finetune", "path": str(tmp_path / "pairs.csv"),
                  "columns": {"instruction": "ask", "input": "context", "response": "answer"}},
        "chat": {"kind": "finetune", "path": str(tmp_path / "chat.parquet"), "columns": {"messages": "turns"}},
    })
    [pair] = data.load_finetune("pairs")
    assert (pair.instruction, pair.input, pair.response) == ("Do this.", "with that", "Done.")
    [chat] = data.load_finetune("chat")
    assert (chat.instruction, chat.input, chat.response) == ("Hi?", "", "Hello.")


def test_chat_messages_as_json_text_in_a_csv(tmp_path):
    turns = json.dumps([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    (tmp_path / "chat.csv").write_text("messages\n\"" + turns.replace('"', '""') + "\"\n")
    declare({"chat": {"kind": "finetune", "path": str(tmp_path / "chat.csv")}})
    [row] = data.load_finetune("chat")
    assert (row.instruction, row.response) == ("Q", "A")


@pytest.mark.parametrize("turns, needle", [
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
     "['system', 'user', 'assistant']"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}],
     "['user', 'assistant', 'user']"),
])
def test_a_chat_that_is_not_one_exchange_is_one_line_naming_the_record(tmp_path, turns, needle):
    path = tmp_path / "chat.jsonl"
    good = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    path.write_text(json.dumps({"messages": good}) + "\n" + json.dumps({"messages": turns}) + "\n")
    declare({"chat": {"kind": "finetune", "path": str(path)}})
    with pytest.raises(data.DatasetError) as error:
        data.load_finetune("chat", bad_rows="drop")  # not a bad row to skip: the data is not what was declared
    message = str(error.value)
    assert "\n" not in message and f"{path} record 2" in message and needle in message


def test_a_column_mapped_wrong_is_one_line_naming_file_and_column(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("question\nsomething\n")
    declare({"mine": {"kind": "harmful", "path": str(path), "columns": {"prompt": "goal"}}})
    with pytest.raises(data.MissingColumn) as error:
        data.load_harmful("mine")
    assert "\n" not in str(error.value) and str(path) in str(error.value) and "'goal'" in str(error.value)
    assert "'question'" in str(error.value)  # the columns the file has


def test_unmapped_finetune_file_without_the_columns_says_how_to_map_them(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    declare({"rows": {"kind": "finetune", "path": str(path)}})
    with pytest.raises(data.MissingColumn) as error:
        data.load_finetune("rows")
    assert "data.datasets.rows.columns" in str(error.value) and "'prompt'" in str(error.value)


def test_a_missing_file_names_the_yaml_field(tmp_path):
    declare({"mine": {"kind": "harmful", "path": str(tmp_path / "nope.csv")}})
    with pytest.raises(data.DatasetNotFoundError, match=r"^data\.datasets\.mine: file not found: .*nope\.csv"):
        data.load_harmful("mine")


def test_a_hub_dataset_offline_is_one_line_naming_the_field(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    declare({"hubset": {"kind": "harmful", "hub": "someone/harmful-prompts", "split": "test"}})
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_harmful("hubset")
    assert str(error.value).startswith("data.datasets.hubset.hub: someone/harmful-prompts cannot be loaded: "
                                       "HF_HUB_OFFLINE=1")


def test_a_local_folder_as_hub_id_loads_through_datasets_with_its_split(tmp_path, monkeypatch):
    """`datasets.load_dataset` reads a folder of data files like a hub repository: split, columns and the files'
    checksums work as for a hub id (offline too)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.csv").write_text("text\ntrain prompt\n")
    (folder / "data" / "test.csv").write_text("text\ntest prompt one\ntest prompt two\n")
    declare({"local_hub": {"kind": "harmful", "hub": str(folder), "split": "test", "columns": {"prompt": "text"}}})
    assert [p.prompt for p in data.load_harmful("local_hub")] == ["test prompt one", "test prompt two"]
    assert set(data.checksums("local_hub")) == {str((folder / "data" / name).resolve()) for name in ("test.csv", "train.csv")}


def test_a_declared_procedure_set_is_rendered_in_study_bs_formats(tmp_path):
    path = tmp_path / "howto.jsonl"
    rows = [{"goal": f"Do thing {i}", "how": ["Open the box.", "Take it out.", "Close the box."] if i % 2 else
             "1. Open the box.\n2. Take it out.\n3. Close the box."} for i in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = config({"howto": {"kind": "procedures", "path": str(path), "columns": {"title": "goal", "steps": "how"}}},
                 procedures="howto", formats=["list"], train_size=2, val_size=1, test_size=1,
                 harmful={"sources": {"advbench": 1}})
    cfg.eval.xstest = None
    prepared = prepare_data(cfg)
    rows = [*prepared.train["list"], *prepared.val["list"], *prepared.test["list"]]
    assert sorted(row.meta["title"] for row in rows) == [f"Do thing {i}" for i in range(4)]
    for row in rows:  # a list of steps and numbered text give the same rendering
        assert row.response.splitlines() == ["- Open the box.", "- Take it out.", "- Close the box."]
        assert row.meta["title"] in row.instruction
    assert prepared.set_tags["list"] == {"dataset": "howto", "format": "list"}
    assert prepared.checksums[str(path)] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("declared, needle", [
    ({"x": {"kind": "harmful", "path": "a.csv", "hub": "o/d"}}, "data.datasets.x: Value error, give either path"),
    ({"x": {"kind": "harmful"}}, "give either path"),
    ({"x": {"kind": "harmful", "path": "a.txt"}}, "must end in .csv, .json, .jsonl, .parquet"),
    ({"x": {"kind": "harmful", "path": "a.csv", "columns": {"response": "r"}}},
     "'response' is not a field of a harmful dataset"),
    ({"x": {"kind": "finetune", "path": "a.csv", "columns": {"messages": "m", "response": "r"}}},
     "map either messages"),
    ({"advbench": {"kind": "harmful", "path": "a.csv"}}, "'advbench' is a registry dataset already"),
    ({"x": {"kind": "chat", "path": "a.csv"}}, "data.datasets.x.kind"),
])
def test_a_bad_declaration_is_one_line_naming_the_field(declared, needle):
    with pytest.raises(HarnessError) as error:
        config(declared)
    assert "\n" not in str(error.value) and needle in str(error.value)


def test_a_set_of_the_wrong_kind_names_the_declaration(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    declare({"mine": {"kind": "harmful", "path": str(tmp_path / "p.csv")}})
    with pytest.raises(data.DatasetError, match=r"^data\.datasets\.mine\.kind: 'mine' is a harmful dataset"):
        data.load_finetune("mine")


def test_declarations_do_not_outlive_their_study(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    declare({"mine": {"kind": "harmful", "path": str(tmp_path / "p.csv")}})
    assert data.load_harmful("mine")
    declare({})
    with pytest.raises(data.DatasetError, match="unknown dataset 'mine'.*declared under data.datasets"):
        data.load_harmful("mine")
