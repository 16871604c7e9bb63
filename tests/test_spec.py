"""Pipeline specs: the shipped ones load, mistakes name the field, fingerprints track outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from glinthawk_dask.pipeline.spec import SpecError, load_spec, parse_spec

PIPELINES = Path(__file__).parent.parent / "pipelines"
MINIMAL = {"input": {"urls": "data/*.jsonl"}, "output": {"url": "out.zarr"}}


def _with(**changes):
    d = {k: dict(v) for k, v in MINIMAL.items()}
    for path, value in changes.items():
        node = d
        *parents, leaf = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return d


def test_quickstart_spec_loads_and_points_at_the_bundled_prompts():
    spec = load_spec(PIPELINES / "quickstart.yaml")
    assert spec.name == "quickstart" and spec.model == "smollm2-135m-instruct"
    (url,) = spec.input.urls
    assert Path(url) == PIPELINES / "prompts" / "quickstart.jsonl" and Path(url).exists()
    assert spec.input.format == "jsonl" and spec.output.url == "quickstart.zarr"
    assert spec.sampling.max_tokens == 64 and spec.sampling.is_greedy
    assert spec.topology.mode == "two-tier" and spec.topology.max_seq_len == 512


def test_s3_spec_expands_the_environment(monkeypatch):
    monkeypatch.setenv("PROMPTS_BUCKET", "my-bucket")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    spec = load_spec(PIPELINES / "s3-jsonl.yaml")
    assert spec.input.urls == ("s3://my-bucket/prompts/*.jsonl*",)
    assert spec.output.url == "s3://my-bucket/completions/s3-jsonl.zarr"
    assert spec.storage_options == {"s3": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert "storage_options" not in spec.to_dict()  # never recorded in outputs


def test_unset_environment_variable_is_named(monkeypatch):
    monkeypatch.delenv("PROMPTS_BUCKET", raising=False)
    with pytest.raises(SpecError, match=r"\$\{PROMPTS_BUCKET\}"):
        load_spec(PIPELINES / "s3-jsonl.yaml")


@pytest.mark.parametrize(
    "data, where",
    [
        (_with(input__format="xml"), "input.format: must be one of jsonl, parquet, csv, text"),
        ({"input": {"urls": "data/x.bin"}, "output": {"url": "o"}}, "input.format: cannot tell the format"),
        (_with(input__compression="lzma9"), "input.compression: unknown compression"),
        (_with(input__text_mode="page"), "input.text_mode"),
        (_with(input__blocksize="lots"), "input.blocksize"),
        (_with(input__urls=[]), "input.urls"),
        ({"output": {"url": "o"}}, "input: must be a mapping"),
        ({"input": {"urls": "a.jsonl"}}, "output: must be a mapping"),
        (_with(output__url=""), "output.url"),
        (_with(output__chunk_rows=0), "output.chunk_rows: must be at least 1"),
        (_with(output__commit_seconds=0), "output.commit_seconds: must be a positive number of seconds or null"),
        (_with(output__commit_seconds="1m"), "output.commit_seconds: must be a positive number"),
        (_with(sampling={"temperature": -1}), "sampling: "),
        (_with(sampling={"temprature": 1}), "temprature"),
        (_with(topology={"mode": "three-tier"}), "topology.mode"),
        (_with(topology={"micro_batches": "many"}), "topology.micro_batches"),
        (_with(topology={"max_seq_len": "long"}), "topology.max_seq_len: must be an integer"),
        (_with(topology={"gpus": 2}), "topology.gpus: unknown field"),
        (_with(fields={"text": "body"}), "fields.text: unknown field"),
        (_with(fields={"prompt": 3}), "fields.prompt: must be a non-empty string"),
        (_with(template="{unclosed"), "template: not a valid format string"),
        (_with(chat="yes"), "chat: must be true or false"),
        (_with(colour="blue"), "colour: unknown field"),
        ("just text", "a spec must be a mapping"),
    ],
)
def test_mistakes_name_the_field(data, where):
    with pytest.raises(SpecError) as e:
        parse_spec(data, source="bad.yaml")
    assert str(e.value).startswith("bad.yaml: ") and where in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(SpecError, match="no such pipeline spec"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_paths_resolve_against_the_spec_file(tmp_path):
    (tmp_path / "specs").mkdir()
    f = tmp_path / "specs" / "p.yaml"
    f.write_text("input: {urls: [../data/a.jsonl, 's3://b/k/*.parquet', /abs/x.csv.gz]}\noutput: {url: o.zarr}\n")
    spec = load_spec(f)
    assert spec.input.urls == (str(tmp_path / "data" / "a.jsonl"), "s3://b/k/*.parquet", "/abs/x.csv.gz")
    assert spec.input.format == "jsonl" and spec.output.url == "o.zarr"
    assert parse_spec(_with(input__urls="x.csv.gz")).input.format == "csv"


def test_fingerprint_tracks_what_decides_the_rows():
    base = parse_spec(MINIMAL).fingerprint()
    assert parse_spec(MINIMAL).fingerprint() == base
    assert parse_spec(_with(sampling={"max_tokens": 7})).fingerprint() != base
    assert parse_spec(_with(model="random:tiny-gqa")).fingerprint() != base
    assert parse_spec(_with(template="Q: {prompt}")).fingerprint() != base
    assert parse_spec(_with(topology={"max_seq_len": 1024})).fingerprint() != base
    # where and how fast it runs does not change the rows
    assert parse_spec(_with(topology={"micro_batch_size": 4, "mode": "in-process"})).fingerprint() == base
    assert parse_spec(_with(output__url="elsewhere.zarr", output__chunk_rows=3)).fingerprint() == base
    assert parse_spec(_with(output__commit_seconds=5)).fingerprint() == base


def test_commit_seconds_default_to_a_minute_and_take_null():
    assert parse_spec(MINIMAL).output.commit_seconds == 60.0
    assert parse_spec(_with(output__commit_seconds=2.5)).output.commit_seconds == 2.5
    assert parse_spec(_with(output__commit_seconds=None)).output.commit_seconds is None


def test_micro_batch_knobs_take_auto_or_a_positive_int():
    topo = parse_spec(_with(topology={"micro_batch_size": "auto", "micro_batches": "auto"})).topology
    assert topo.micro_batch_size == "auto" and topo.micro_batches == "auto"
    assert parse_spec(_with(topology={"micro_batch_size": 8})).topology.micro_batch_size == 8
    for bad in ("fast", 0):
        with pytest.raises(SpecError, match="topology.micro_batch_size"):
            parse_spec(_with(topology={"micro_batch_size": bad}))


def test_hybrid_mode_and_a_dense_kv_budget():
    topo = parse_spec(_with(topology={"mode": "hybrid", "dense_kv_budget": "200MB"})).topology
    assert topo.mode == "hybrid" and topo.dense_kv_budget == 200_000_000
    assert parse_spec(_with(topology={"mode": "single-tier", "dense_kv_budget": 1024})).topology.dense_kv_budget == 1024
    for bad, why in (("lots", "must be a size"), (0, "must be positive")):
        with pytest.raises(SpecError, match=f"topology.dense_kv_budget.*{why}"):
            parse_spec(_with(topology={"mode": "hybrid", "dense_kv_budget": bad}))
    with pytest.raises(SpecError, match="topology.dense_kv_budget.*single-tier or hybrid"):
        parse_spec(_with(topology={"mode": "two-tier", "dense_kv_budget": "1GB"}))
    topo = parse_spec(_with(topology={"mode": "hybrid", "local_micro_batches": 2})).topology
    assert topo.local_micro_batches == 2
    with pytest.raises(SpecError, match="topology.local_micro_batches.*for mode hybrid"):
        parse_spec(_with(topology={"mode": "single-tier", "local_micro_batches": 1}))
