"""Text <-> token ids, through a Hugging Face fast tokenizer.

:meth:`Tokenizer.from_checkpoint` builds the tokenizer of a GGUF file (converted by
``transformers`` from the GGUF metadata, which takes seconds, so the result is cached as
plain JSON files) or of a Hugging Face directory.  Synthetic checkpoints have none.
Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import InvalidRequestError, ModelLoadError

__all__ = ["Tokenizer", "tokenizer_cache_dir"]

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump to invalidate caches written by older code


def tokenizer_cache_dir() -> Path:
    """``$GLINTHAWK_CACHE_DIR/tokenizers``, else ``~/.cache/glinthawk/tokenizers``."""
    base = os.environ.get("GLINTHAWK_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "glinthawk"
    return root / "tokenizers"


def _offline_transformers():
    """Import transformers with the Hub switched off (we only ever read local files)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    return transformers


class Tokenizer:
    """A thin wrapper of a ``transformers`` fast tokenizer with plain-list outputs.

    ``eos_token_ids`` holds every id that ends generation: the tokenizer's EOS plus the
    ones declared by the checkpoint (``generation_config.json``, GGUF ``eot``/``eom``).
    """

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Iterable[int] = ()):
        self.hf = hf_tokenizer
        eos = [hf_tokenizer.eos_token_id] if hf_tokenizer.eos_token_id is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *map(int, extra_eos_ids)]))

    # -- properties -------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return len(self.hf)

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens added as the tokenizer's defaults say."""
        return [int(i) for i in self.hf(text)["input_ids"]]

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat (``[{"role": ..., "content": ...}, ...]``) ready for the reply."""
        if not self.has_chat_template:
            raise InvalidRequestError("this model's tokenizer has no chat template; send a plain prompt")
        out = self.hf.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if not isinstance(out, (list, tuple)):  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        if out and isinstance(out[0], (list, tuple)):  # batched form
            out = out[0]
        return [int(i) for i in out]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out."""
        return self.hf.decode(list(ids), skip_special_tokens=True)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, source: Any, *, cache_dir: str | Path | None = None) -> Tokenizer | None:
        """The tokenizer of a GGUF or HF checkpoint; None for checkpoints without one (synthetic)."""
        from .model.gguf import GGUFCheckpoint
        from .model.hf import HFCheckpoint

        if isinstance(source, GGUFCheckpoint):
            return cls.from_gguf(source.path, cache_dir=cache_dir, extra_eos_ids=source.eos_token_ids)
        if isinstance(source, HFCheckpoint):
            return cls.from_hf_dir(source.directory)
        return None

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        """Load the tokenizer files of a Hugging Face checkpoint directory."""
        directory = Path(directory)
        transformers = _offline_transformers()
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # transformers raises many types (OSError, ValueError, ...)
            raise ModelLoadError(f"cannot load a tokenizer from {directory}: {e}") from e
        return cls(tok, extra_eos_ids=_generation_config_eos(directory))

    @classmethod
    def from_gguf(
        cls,
        path: str | Path,
        *,
        cache_dir: str | Path | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> Tokenizer:
        """Tokenizer stored in a GGUF file, converted once and cached under ``cache_dir``.

        ``cache_dir`` defaults to :func:`tokenizer_cache_dir`; the entry's key hashes the
        file's resolved path, size and mtime (and the transformers version).
        """
        path = Path(path).expanduser().resolve()
        transformers = _offline_transformers()
        try:
            entry = Path(cache_dir or tokenizer_cache_dir()) / _cache_key(path, transformers.__version__)
        except OSError as e:
            raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e
        if (entry / "tokenizer.json").is_file():
            try:
                return cls(_load_cached(transformers, entry), extra_eos_ids)
            except Exception as e:  # a damaged cache entry: convert again
                log.warning("ignoring unreadable tokenizer cache %s: %s", entry, e)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True
            )
        except Exception as e:
            raise ModelLoadError(f"cannot build a tokenizer from GGUF file {path}: {e}") from e
        _save_atomically(tok, entry)
        return cls(tok, extra_eos_ids)

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size})"


# classes a converted GGUF tokenizer is saved as (transformers 5 names the fast one
# TokenizersBackend): loaded as that class directly, without AutoTokenizer's lookup
_FAST_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def _load_cached(transformers: Any, entry: Path) -> Any:
    """A tokenizer this module converted and saved in ``entry``.

    ``AutoTokenizer`` would first scan every model package transformers ships for its
    class (about 0.7 s of every process that loads a tokenizer: the client, the dense
    worker, each CPU worker that tokenizes); the class the entry names is used directly
    when it is the plain fast tokenizer, as a converted GGUF tokenizer is.
    """
    config = json.loads((entry / "tokenizer_config.json").read_text())
    if config.get("tokenizer_class") in _FAST_CLASSES:
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(entry), local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(str(entry), local_files_only=True)


def _cache_key(path: Path, transformers_version: str) -> str:
    st = path.stat()
    raw = f"{_CACHE_FORMAT}|{path}|{st.st_size}|{st.st_mtime_ns}|{transformers_version}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _save_atomically(tok: Any, entry: Path) -> None:
    """``save_pretrained`` (JSON files) into a temp dir, then rename it to ``entry``.

    A cache that cannot be written only costs the conversion time next run.
    """
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        tok.save_pretrained(str(tmp))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        log.warning("cannot cache the converted tokenizer under %s: %s", entry, e)


def _generation_config_eos(directory: Path) -> list[int]:
    """``eos_token_id`` (int or list) from ``generation_config.json``, if any."""
    path = directory / "generation_config.json"
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    if isinstance(eos, int):
        return [eos]
    if isinstance(eos, list):
        return [int(i) for i in eos if isinstance(i, int)]
    return []
