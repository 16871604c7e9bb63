"""Read Llama weights from a Hugging Face checkpoint directory (``config.json`` + safetensors).

:class:`HFCheckpoint` implements :class:`~glinthawk_dask.model.checkpoint.CheckpointSource`.
Tensors are read one at a time with :func:`safetensors.safe_open` (memory-mapped), so a
worker hosting a slice of layers never reads the rest.  Pickled checkpoints
(``pytorch_model.bin``, ``*.pt``) are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from ..errors import ModelLoadError
from .checkpoint import GLOBAL_NAMES, LAYER_SUFFIXES, MissingTensorError
from .config import ModelConfig

if TYPE_CHECKING:
    import torch

__all__ = ["HFCheckpoint", "canonical_to_hf_name"]

_GLOBAL_TO_HF = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
_SUFFIX_TO_HF = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"layers\.(\d+)\.(\w+)")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"


def canonical_to_hf_name(name: str) -> str:
    """Map a canonical tensor name to the HF one.

    ``layers.3.wq`` -> ``model.layers.3.self_attn.q_proj.weight``.
    """
    if name in _GLOBAL_TO_HF:
        return _GLOBAL_TO_HF[name]
    m = _LAYER_NAME.fullmatch(name)
    if m is None or m.group(2) not in _SUFFIX_TO_HF:
        raise KeyError(f"not a canonical tensor name: {name!r}")
    return f"model.layers.{m.group(1)}.{_SUFFIX_TO_HF[m.group(2)]}"


class HFCheckpoint:
    """A Hugging Face Llama checkpoint directory as a :class:`CheckpointSource`.

    ``HFCheckpoint(directory)`` reads ``config.json`` and the safetensors headers (or
    ``model.safetensors.index.json``), checks every needed tensor is present, and raises
    :class:`ModelLoadError` naming the directory otherwise.  ``get`` returns tensors in
    their stored dtype (float32/float16/bfloat16); :func:`load_slice` casts them.

    Attributes: ``directory``, ``config``, ``name`` (the directory's name),
    ``hf_config`` (the parsed ``config.json``).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser().resolve()
        if not self.directory.is_dir():
            raise ModelLoadError(f"Hugging Face checkpoint directory not found: {self.directory}")
        self.name = self.directory.name
        self.hf_config: dict[str, Any] = self._read_config()
        self.config: ModelConfig = self._build_config(self.hf_config)
        self._weight_map: dict[str, str] = self._find_weights()  # HF name -> file name
        self._check_tensors()

    # -- config -------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        path = self.directory / "config.json"
        if not path.is_file():
            raise ModelLoadError(
                f"{self.directory} has no config.json; a Hugging Face checkpoint directory "
                "needs config.json and *.safetensors weights (or pass a .gguf file)"
            )
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{path} does not hold a JSON object")
        return cfg

    def _build_config(self, c: dict[str, Any]) -> ModelConfig:
        where = self.directory / "config.json"
        model_type = c.get("model_type")
        if model_type != "llama":
            raise ModelLoadError(
                f"{where}: model_type is {model_type!r}; only 'llama' models are supported"
            )
        for key in ("rope_parameters", "rope_scaling"):  # transformers 5 / older configs
            rope = c.get(key) or {}
            rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else rope
            if rope_type not in (None, "default"):
                raise ModelLoadError(
                    f"{where}: RoPE scaling type {rope_type!r} is not supported (only 'default')"
                )
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ModelLoadError(f"{where}: attention/MLP biases are not supported")
        if c.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (only 'silu')")
        rope_theta = c.get("rope_theta")
        if rope_theta is None and isinstance(c.get("rope_parameters"), dict):
            rope_theta = c["rope_parameters"].get("rope_theta")
        try:
            n_heads = int(c["num_attention_heads"])
            dim = int(c["hidden_size"])
            return ModelConfig(
                name=self.name,
                dim=dim,
                n_layers=int(c["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
                head_dim=int(c.get("head_dim") or dim // n_heads),
                ffn_dim=int(c["intermediate_size"]),
                vocab_size=int(c.get("vocab_size", 32000)),
                norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                max_seq_len=int(c.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ModelLoadError(f"{where} lacks required key {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{where}: invalid model shape: {e}") from e

    # -- weight files ---------------------------------------------------------------------
    def _find_weights(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from e
            for fname in sorted(set(weight_map.values())):
                if not (self.directory / fname).is_file():
                    raise ModelLoadError(f"{index} names {fname}, which is not in {self.directory}")
            return dict(weight_map)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickles:
                raise ModelLoadError(
                    f"{self.directory} holds only pickled weights ({', '.join(pickles)}); they are "
                    "not loaded because unpickling can run arbitrary code. Convert the checkpoint "
                    "to safetensors (e.g. save_pretrained(..., safe_serialization=True))"
                )
            raise ModelLoadError(f"{self.directory} has no *.safetensors weight files")
        weight_map: dict[str, str] = {}
        for path in files:
            try:
                with safe_open(path, framework="pt") as f:  # reads the header only
                    for key in f.keys():
                        weight_map[key] = path.name
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from e
        return weight_map

    def _check_tensors(self) -> None:
        """Fail early, naming the tensor and directory, if a needed tensor is absent."""
        names = [n for n in GLOBAL_NAMES if n != "lm_head" or not self.config.tie_embeddings]
        names += [f"layers.{i}.{s}" for i in range(self.config.n_layers) for s in LAYER_SUFFIXES]
        missing = [canonical_to_hf_name(n) for n in names if not self.has(n)]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise MissingTensorError(
                f"{self.directory}: checkpoint lacks {len(missing)} tensor(s): {shown}"
            )

    # -- CheckpointSource -------------------------------------------------------------------
    def has(self, name: str) -> bool:
        """Whether the checkpoint holds canonical tensor ``name`` (reads nothing)."""
        try:
            return canonical_to_hf_name(name) in self._weight_map
        except KeyError:
            return False

    def get(self, name: str) -> torch.Tensor:
        """Read canonical tensor ``name`` (``[out, in]`` or ``[n]``) in its stored dtype."""
        if not self.has(name):
            raise MissingTensorError(f"{self.directory}: checkpoint has no tensor {name!r}")
        hf_name = canonical_to_hf_name(name)
        path = self.directory / self._weight_map[hf_name]
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(hf_name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: cannot read tensor {hf_name}: {e}") from e

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.directory)!r})"
