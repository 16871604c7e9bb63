"""Read Llama-family weights from a GGUF file (llama.cpp's format).

:class:`GGUFCheckpoint` implements :class:`~glinthawk_dask.model.checkpoint.CheckpointSource`.
The file is memory-mapped and parsed by :class:`~.gguf_file.GGUFFile` (tens of
milliseconds, where ``gguf.GGUFReader`` takes seconds over a large vocabulary); a tensor
is dequantized (by the ``gguf`` library, every type it supports) only when
:meth:`GGUFCheckpoint.get` asks for it, so a worker that hosts layers ``[10, 12)``
touches only those layers' bytes.

Tensors come back in the Hugging Face layout: ``[out_features, in_features]`` and the
q/k rows in HF rotary order (llama.cpp's converter interleaves them; we undo it exactly
as ``transformers`` does).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelLoadError
from .checkpoint import GLOBAL_NAMES, LAYER_SUFFIXES, MissingTensorError
from .config import ModelConfig
from .gguf_file import GGUFArray, GGUFFile

if TYPE_CHECKING:
    import torch

__all__ = ["GGUFCheckpoint", "canonical_to_gguf_name"]


_GLOBAL_TO_GGUF = {"embed": "token_embd", "final_norm": "output_norm", "lm_head": "output"}
_SUFFIX_TO_GGUF = {
    "attn_norm": "attn_norm",
    "wq": "attn_q",
    "wk": "attn_k",
    "wv": "attn_v",
    "wo": "attn_output",
    "ffn_norm": "ffn_norm",
    "w_gate": "ffn_gate",
    "w_up": "ffn_up",
    "w_down": "ffn_down",
}
_LAYER_NAME = re.compile(r"layers\.(\d+)\.(\w+)")


def canonical_to_gguf_name(name: str) -> str:
    """Map a canonical tensor name (``layers.3.wq``) to its GGUF name (``blk.3.attn_q.weight``)."""
    if name in _GLOBAL_TO_GGUF:
        return _GLOBAL_TO_GGUF[name] + ".weight"
    m = _LAYER_NAME.fullmatch(name)
    if m is None or m.group(2) not in _SUFFIX_TO_GGUF:
        raise KeyError(f"not a canonical tensor name: {name!r}")
    return f"blk.{m.group(1)}.{_SUFFIX_TO_GGUF[m.group(2)]}.weight"


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (``transformers``' ``_reverse_permute_weights``).

    ``w``: [n_head * head_dim, in].  llama.cpp stores each head's rows as
    (pairs, 2) interleaved; HF keeps (2, pairs) halves.
    """
    shape = w.shape
    # [n_head, head_dim // 2, 2, in] -> [n_head, 2, head_dim // 2, in] -> [n_head * head_dim, in]
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(2, 1).reshape(shape)


class GGUFCheckpoint:
    """A Llama-architecture GGUF file as a :class:`CheckpointSource`.

    ``GGUFCheckpoint(path)`` parses the header and metadata (no tensor data) and raises
    :class:`ModelLoadError` naming the file when it is not a readable llama GGUF.

    Attributes: ``path`` (resolved :class:`Path`), ``config`` (:class:`ModelConfig` from
    the ``llama.*`` metadata), ``name`` (``general.name`` or the file stem).

    Instances pickle as their path and metadata; the memory map is reopened on first use.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        file = self._open()
        self._file: GGUFFile | None = file
        self.metadata: dict[str, Any] = {k: v for k, v in file.metadata.items() if not isinstance(v, GGUFArray)}
        arch = self.metadata.get("general.architecture")
        if arch != "llama":
            raise ModelLoadError(
                f"{self.path}: GGUF architecture is {arch!r}; only 'llama' models are supported"
            )
        self.name: str = self.metadata.get("general.name") or self.path.stem
        self._shapes = {name: t.shape for name, t in file.tensors.items()}  # [out, in] or [n]
        self.config: ModelConfig = self._build_config(file)
        self._check_tensors()

    # -- opening / metadata ------------------------------------------------------------
    def _open(self) -> GGUFFile:
        if not self.path.is_file():
            raise ModelLoadError(f"GGUF file not found: {self.path}")
        try:
            return GGUFFile(self.path)
        except Exception as e:  # ValueError on garbage; OSError, UnicodeDecodeError, ...
            raise ModelLoadError(
                f"{self.path} is not a readable GGUF file (corrupt or truncated?): "
                f"{type(e).__name__}: {e}"
            ) from e

    @property
    def file(self) -> GGUFFile:
        """The underlying memory-mapped :class:`~.gguf_file.GGUFFile` (reopened after unpickling)."""
        if self._file is None:
            self._file = self._open()
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None  # a memory map does not travel; reopen lazily
        return state

    def _meta(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def _build_config(self, file: GGUFFile) -> ModelConfig:
        def need(key: str) -> Any:
            value = self._meta(key)
            if value is None:
                raise ModelLoadError(f"{self.path}: GGUF metadata lacks required key {key!r}")
            return value

        scaling = self._meta("llama.rope.scaling.type")
        if scaling not in (None, "none") or "rope_freqs.weight" in self._shapes:
            raise ModelLoadError(
                f"{self.path}: the model uses RoPE scaling ({scaling or 'rope_freqs'}), "
                "which this engine does not support"
            )
        dim = int(need("llama.embedding_length"))
        n_heads = int(need("llama.attention.head_count"))
        head_dim = self._meta("llama.attention.key_length")
        if head_dim is None:
            head_dim = self._meta("llama.rope.dimension_count", dim // n_heads)
        vocab = self._meta("llama.vocab_size")
        if vocab is None:
            tokens = file.metadata.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if isinstance(tokens, GGUFArray) else self._shapes.get(
                "token_embd.weight", (0,))[0]
        try:
            return ModelConfig(
                name=self.name,
                dim=dim,
                n_layers=int(need("llama.block_count")),
                n_heads=n_heads,
                n_kv_heads=int(self._meta("llama.attention.head_count_kv", n_heads)),
                head_dim=int(head_dim),
                ffn_dim=int(need("llama.feed_forward_length")),
                vocab_size=int(vocab),
                norm_eps=float(self._meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(self._meta("llama.rope.freq_base", 10000.0)),
                max_seq_len=int(self._meta("llama.context_length", 4096)),
                tie_embeddings="output.weight" not in self._shapes,
            )
        except ValueError as e:
            raise ModelLoadError(f"{self.path}: inconsistent GGUF model metadata: {e}") from e

    def _check_tensors(self) -> None:
        """Fail early, naming the file, if a tensor the config needs is absent."""
        names = [n for n in GLOBAL_NAMES if n != "lm_head" or not self.config.tie_embeddings]
        names += [f"layers.{i}.{s}" for i in range(self.config.n_layers) for s in LAYER_SUFFIXES]
        missing = [canonical_to_gguf_name(n) for n in names if not self.has(n)]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ModelLoadError(f"{self.path}: GGUF file lacks {len(missing)} tensor(s): {shown}")

    # -- tokenizer-facing metadata -------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """``tokenizer.chat_template`` (Jinja), or None."""
        return self.metadata.get("tokenizer.chat_template")

    @property
    def bos_token_id(self) -> int | None:
        return self.metadata.get("tokenizer.ggml.bos_token_id")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos`` plus the end-of-turn ids (``eot``, ``eom``) the file declares."""
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id")
        ids = [self.metadata[k] for k in keys if isinstance(self.metadata.get(k), int)]
        return tuple(dict.fromkeys(ids))

    # -- CheckpointSource -------------------------------------------------------------
    def has(self, name: str) -> bool:
        """Whether the file holds canonical tensor ``name`` (reads nothing)."""
        try:
            return canonical_to_gguf_name(name) in self._shapes
        except KeyError:
            return False

    def get(self, name: str) -> torch.Tensor:
        """Dequantize canonical tensor ``name`` to a float32 ``[out, in]`` (or ``[n]``) tensor."""
        import gguf.quants  # here, with torch: the config alone (planning, checks) needs neither
        import torch

        if not self.has(name):
            raise MissingTensorError(f"{self.path}: GGUF file has no tensor {name!r}")
        gname = canonical_to_gguf_name(name)
        t = self.file.tensors[gname]
        try:
            w = gguf.quants.dequantize(t.data, t.qtype)
        except NotImplementedError as e:
            raise ModelLoadError(
                f"{self.path}: tensor {gname} has type {t.qtype.name}, "
                "which the gguf library cannot dequantize"
            ) from e
        w = np.asarray(w, dtype=np.float32).reshape(self._shapes[gname])  # [out, in] or [n]
        if name.endswith(".wq"):
            w = _reverse_permute(w, self.config.n_heads)  # [H * D, dim]
        elif name.endswith(".wk"):
            w = _reverse_permute(w, self.config.n_kv_heads)  # [KVH * D, dim]
        if not (w.flags.writeable and w.flags.c_contiguous):
            w = np.array(w, dtype=np.float32, order="C")  # F32 data is a read-only memmap view
        return torch.from_numpy(w)

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, name={self.name!r})"
