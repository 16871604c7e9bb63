"""Pipeline specs: a YAML file that says what to read, how to generate, where to write.

.. code-block:: yaml

    name: quickstart
    model: smollm2-135m-instruct          # preset, GGUF file, HF directory, random:<preset>
    input:
      urls: prompts/quickstart.jsonl       # URL(s) or glob(s); relative paths: from this file
      format: jsonl                        # jsonl | parquet | csv | text [default: by extension]
      compression: infer                   # infer | none | gzip | bz2 | xz | zstd | ...
      text_mode: line                      # text format: line (a prompt per line) | file
      blocksize: 64MiB                     # split big uncompressed line files and Parquet files into tasks
    fields: {id: id, prompt: prompt}       # output field -> input column
    template: null                         # e.g. "Summarize: {text}" over the row's columns
    chat: false                            # apply the chat template to plain prompts
    sampling: {max_tokens: 64, temperature: 0}
    topology:
      mode: two-tier                       # two-tier | single-tier | hybrid | in-process
      dense_kv_budget: null                # KV bytes per dense worker (single-tier, hybrid), e.g. 200MB
      local_micro_batches: null            # hybrid: micro-batches with KV on the dense worker (null: planned)
      dense_workers: 1                     # dense workers (layer slices)
      attention_workers: 2                 # attention worker processes of the local cluster
      micro_batch_size: 32
      micro_batches: auto
      max_seq_len: 512                     # KV slot: prompt + completion tokens
    output:
      url: quickstart.zarr                 # relative paths: from the working directory
      chunk_rows: 256
      commit_seconds: 60                   # commit rows finished this long ago even if their chunk is not full
    storage_options:                       # per protocol, passed to fsspec; ${VAR} is expanded
      s3: {endpoint_url: "${S3_ENDPOINT_URL}"}

:func:`load_spec` validates everything and raises :class:`SpecError` naming the
field: ``pipelines/x.yaml: sampling.temperature: must be >= 0 (got -1)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import fsspec
import yaml
from dask.utils import parse_bytes

from ..errors import GlinthawkError, InvalidRequestError
from ..sampling import SamplingParams

__all__ = [
    "FORMATS", "InputSpec", "OutputSpec", "PipelineSpec", "SpecError", "TopologySpec", "load_spec", "options_for",
    "parse_spec",
]

FORMATS = ("jsonl", "parquet", "csv", "text")
MODES = ("two-tier", "single-tier", "hybrid", "in-process")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
               ".csv": "csv", ".txt": "text", ".text": "text"}
_COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".lz4", ".snappy", ".zip"}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SpecError(GlinthawkError):
    """A pipeline spec is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class InputSpec:
    """Where prompts come from and how to parse them."""

    urls: tuple[str, ...]
    format: str
    compression: str | None = "infer"
    text_mode: str = "line"
    blocksize: int | None = 64 * 2**20


@dataclass(frozen=True)
class TopologySpec:
    """Where and how the model runs."""

    mode: str | None = None
    dense_workers: int = 1
    attention_workers: int | None = None
    micro_batch_size: int | str | None = None  # or "auto": planned from the cluster's profile
    micro_batches: int | str | None = None
    max_seq_len: int = 512
    dense_kv_budget: int | None = None  # KV bytes a run may keep on each dense worker
    local_micro_batches: int | None = None  # hybrid: fixed split (None: the planner's)
    device: str | None = None
    dtype: str | None = None


@dataclass(frozen=True)
class OutputSpec:
    """Where completions go."""

    url: str
    chunk_rows: int = 256
    commit_seconds: float | None = 60.0  # commit rows buffered this long (None: only whole chunks and the end)


@dataclass(frozen=True)
class PipelineSpec:
    """A validated pipeline spec (see the module docstring for the file format)."""

    name: str
    model: str
    input: InputSpec
    output: OutputSpec
    fields: Mapping[str, str] = field(default_factory=dict)
    template: str | None = None
    chat: bool = False
    sampling: SamplingParams = SamplingParams()
    topology: TopologySpec = TopologySpec()
    storage_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = "<spec>"

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain values, without storage options (they may hold secrets)."""
        d = dataclasses.asdict(self)
        d.pop("storage_options")
        d.pop("source")
        d["sampling"] = self.sampling.to_dict()
        d["input"]["urls"] = list(self.input.urls)
        return d

    def fingerprint(self) -> str:
        """A hash of everything that decides the output rows: model, input, parsing,
        prompts and sampling, and the KV slot size (it decides where long completions
        stop).  Topology knobs that do not change tokens and the output location are
        left out, so an output can be resumed from another cluster."""
        d = self.to_dict()
        decisive = {k: d[k] for k in ("model", "input", "fields", "template", "chat", "sampling")}
        decisive["max_seq_len"] = self.topology.max_seq_len
        blob = json.dumps(decisive, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **changes: Any) -> "PipelineSpec":
        return dataclasses.replace(self, **changes)


def load_spec(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> PipelineSpec:
    """Read and validate a pipeline spec from a local path or an fsspec URL."""
    path = os.fspath(path)
    try:
        with fsspec.open(path, "rt", encoding="utf-8", **(storage_options or {})) as f:
            text = f.read()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such pipeline spec") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read the spec ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    protocol, _ = fsspec.core.split_protocol(path)
    base = os.path.dirname(os.path.abspath(path)) if protocol in (None, "file") else path.rsplit("/", 1)[0]
    return parse_spec(data, source=path, base=base)


def parse_spec(data: Any, *, source: str = "<spec>", base: str | None = None) -> PipelineSpec:
    """Validate a spec already parsed from YAML; relative input paths resolve against ``base``."""
    v = _Validator(source)
    top = v.mapping(data, "")
    v.known(top, "", ("name", "model", "input", "fields", "template", "chat", "sampling", "topology", "output",
                      "storage_options"))
    inp = _input(v, v.mapping(top.get("input"), "input", required=True), base)
    out = v.mapping(top.get("output"), "output", required=True)
    v.known(out, "output", ("url", "chunk_rows", "commit_seconds"))
    commit = out.get("commit_seconds", 60.0)
    if commit is not None and (isinstance(commit, bool) or not isinstance(commit, (int, float)) or commit <= 0):
        raise v.error("output.commit_seconds", f"must be a positive number of seconds or null (got {commit!r})")
    output = OutputSpec(
        url=_expand(v.string(out.get("url"), "output.url", required=True)),
        chunk_rows=v.integer(out.get("chunk_rows", 256), "output.chunk_rows", minimum=1),
        commit_seconds=None if commit is None else float(commit),
    )
    fields = v.mapping(top.get("fields", {}), "fields")
    allowed = ("id", "prompt", "messages", "prompt_token_ids", *SamplingParams.field_names())
    v.known(fields, "fields", allowed)
    for k, col in fields.items():
        v.string(col, f"fields.{k}", required=True)
    template = top.get("template")
    if template is not None:
        v.string(template, "template")
        try:
            list(string.Formatter().parse(template))
        except ValueError as e:
            raise v.error("template", f"not a valid format string ({e})") from None
    sampling = v.mapping(top.get("sampling", {}), "sampling")
    try:
        params = SamplingParams.from_dict(sampling)
    except InvalidRequestError as e:
        raise v.error("sampling", str(e)) from None
    name = top.get("name") or Path(source).stem
    return PipelineSpec(
        name=v.string(name, "name"),
        model=v.string(top.get("model", "smollm2-135m-instruct"), "model"),
        input=inp,
        output=output,
        fields={k: str(c) for k, c in fields.items()},
        template=template,
        chat=v.boolean(top.get("chat", False), "chat"),
        sampling=params,
        topology=_topology(v, v.mapping(top.get("topology", {}), "topology")),
        storage_options=_storage_options(v, top.get("storage_options", {})),
        source=source,
    )


def _input(v: "_Validator", inp: dict, base: str | None) -> InputSpec:
    v.known(inp, "input", ("urls", "url", "format", "compression", "text_mode", "blocksize"))
    raw = inp.get("urls", inp.get("url"))
    if raw is None:
        raise v.error("input.urls", "required: a URL, a glob or a list of them")
    urls = [raw] if isinstance(raw, str) else raw
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u for u in urls):
        raise v.error("input.urls", f"must be a URL or a non-empty list of URLs (got {raw!r})")
    urls = [_resolve(_expand(u), base) for u in urls]
    fmt = inp.get("format")
    if fmt is None:
        fmt = _format_of(urls[0])
        if fmt is None:
            raise v.error("input.format", f"cannot tell the format of {urls[0]}: set it to one of {', '.join(FORMATS)}")
    elif fmt not in FORMATS:
        raise v.error("input.format", f"must be one of {', '.join(FORMATS)} (got {fmt!r})")
    compression = inp.get("compression", "infer")
    if compression in (None, "none", False):
        compression = None
    elif compression != "infer" and compression not in fsspec.available_compressions():
        raise v.error(
            "input.compression",
            f"unknown compression {compression!r}; use infer, none or one of "
            f"{', '.join(c for c in fsspec.available_compressions() if c)}",
        )
    text_mode = inp.get("text_mode", "line")
    if text_mode not in ("line", "file"):
        raise v.error("input.text_mode", f"must be line or file (got {text_mode!r})")
    blocksize = v.size(inp.get("blocksize", 64 * 2**20), "input.blocksize", "64MiB")
    return InputSpec(tuple(urls), fmt, compression, text_mode, blocksize)


def _topology(v: "_Validator", t: dict) -> TopologySpec:
    v.known(t, "topology", [f.name for f in dataclasses.fields(TopologySpec)])
    mode = t.get("mode")
    if mode is not None and mode not in MODES:
        raise v.error("topology.mode", f"must be one of {', '.join(MODES)} (got {mode!r})")
    mb = t.get("micro_batches")
    if mb is not None and mb != "auto":
        mb = v.integer(mb, "topology.micro_batches", minimum=1, also="or auto")
    size = t.get("micro_batch_size")
    if size is not None and size != "auto":
        size = v.integer(size, "topology.micro_batch_size", minimum=1, also="or auto")
    att = t.get("attention_workers")
    budget = v.size(t.get("dense_kv_budget"), "topology.dense_kv_budget", "200MB")
    if budget is not None:
        if mode in ("two-tier", "in-process"):
            raise v.error("topology.dense_kv_budget", f"is for mode single-tier or hybrid (mode is {mode})")
    local = t.get("local_micro_batches")
    if local is not None:
        local = v.integer(local, "topology.local_micro_batches", minimum=0)
        if mode != "hybrid":
            raise v.error("topology.local_micro_batches", f"is for mode hybrid (mode is {mode})")
    return TopologySpec(
        mode=mode,
        dense_workers=v.integer(t.get("dense_workers", 1), "topology.dense_workers", minimum=1),
        attention_workers=None if att is None else v.integer(att, "topology.attention_workers", minimum=1),
        micro_batch_size=size,
        micro_batches=mb,
        max_seq_len=v.integer(t.get("max_seq_len", 512), "topology.max_seq_len", minimum=2),
        device=None if t.get("device") is None else v.string(t["device"], "topology.device"),
        dtype=None if t.get("dtype") is None else v.string(t["dtype"], "topology.dtype"),
        dense_kv_budget=budget,
        local_micro_batches=local,
    )


def _storage_options(v: "_Validator", so: Any) -> dict[str, dict[str, Any]]:
    so = v.mapping(so, "storage_options")
    out = {}
    for protocol, opts in so.items():
        opts = v.mapping(opts, f"storage_options.{protocol}")
        out[str(protocol)] = {k: _expand_all(x) for k, x in opts.items()}
    return out


def options_for(url: str, storage_options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """The entry of ``storage_options`` (keyed by protocol) for ``url``'s protocol or one
    of its aliases (``s3a`` takes the ``s3`` entry)."""
    if not storage_options:
        return {}
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    if protocol in storage_options:
        return dict(storage_options[protocol])
    try:
        aliases = fsspec.get_filesystem_class(protocol).protocol
    except (ImportError, ValueError):
        return {}
    for name in (aliases,) if isinstance(aliases, str) else aliases:
        if name in storage_options:
            return dict(storage_options[name])
    return {}


def _format_of(url: str) -> str | None:
    name = url.rstrip("/").lower()
    stem, ext = os.path.splitext(name)
    if ext in _COMPRESSIONS:
        stem, ext = os.path.splitext(stem)
    return _EXTENSIONS.get(ext)


def _resolve(url: str, base: str | None) -> str:
    protocol, path = fsspec.core.split_protocol(url)
    if protocol not in (None, "file") or base is None or os.path.isabs(path):
        return url
    if fsspec.core.split_protocol(base)[0] not in (None, "file"):
        return f"{base}/{path}"
    return os.path.normpath(os.path.join(base, path))


def _expand(s: str) -> str:
    """``${VAR}`` from the environment; an unset variable is an error naming it."""

    def sub(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise SpecError(f"the spec uses ${{{m.group(1)}}}, which is not set in the environment")
        return os.environ[m.group(1)]

    return _ENV.sub(sub, s)


def _expand_all(x: Any) -> Any:
    if isinstance(x, str):
        return _expand(x)
    if isinstance(x, dict):
        return {k: _expand_all(y) for k, y in x.items()}
    if isinstance(x, list):
        return [_expand_all(y) for y in x]
    return x


class _Validator:
    """Type checks whose errors name the spec file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, where: str, message: str) -> SpecError:
        return SpecError(f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}")

    def mapping(self, x: Any, where: str, required: bool = False) -> dict:
        if x is None and not required:
            return {}
        if not isinstance(x, dict):
            what = "missing" if x is None else f"got {type(x).__name__} {x!r}"
            raise self.error(where, f"must be a mapping ({what})" if where else f"a spec must be a mapping ({what})")
        return x

    def known(self, d: dict, where: str, allowed: Any) -> None:
        for k in d:
            if k not in allowed:
                raise self.error(f"{where}.{k}" if where else str(k),
                                 f"unknown field; known: {', '.join(sorted(allowed))}")

    def string(self, x: Any, where: str, required: bool = False) -> str:
        if x is None and required:
            raise self.error(where, "required")
        if not isinstance(x, str) or not x:
            raise self.error(where, f"must be a non-empty string (got {x!r})")
        return x

    def integer(self, x: Any, where: str, minimum: int | None = None, also: str = "") -> int:
        if isinstance(x, bool) or not isinstance(x, int):
            raise self.error(where, f"must be an integer{' ' + also if also else ''} (got {x!r})")
        if minimum is not None and x < minimum:
            raise self.error(where, f"must be at least {minimum} (got {x})")
        return x

    def size(self, x: Any, where: str, example: str) -> int | None:
        """Bytes from ``64MiB``-like text or a number (None stays None)."""
        if x is None:
            return None
        try:
            n = parse_bytes(x) if isinstance(x, str) else int(x)
        except (ValueError, TypeError):
            raise self.error(where, f"must be a size like {example} or null (got {x!r})") from None
        if n < 1:
            raise self.error(where, f"must be positive (got {x!r})")
        return n

    def boolean(self, x: Any, where: str) -> bool:
        if not isinstance(x, bool):
            raise self.error(where, f"must be true or false (got {x!r})")
        return x
