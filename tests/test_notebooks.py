"""The notebooks in notebooks/ run top to bottom (their cells end with asserts)."""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel() -> str:
    """The ``python3`` kernel: ipykernel in this environment (jupyter_client serves its spec)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.fail("no python3 Jupyter kernel: install ipykernel into this environment")
    return "python3"


def _execute(name: str, kernel: str) -> nbformat.NotebookNode:
    """Run the notebook with notebooks/ as the working directory; a failing cell raises."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)  # every cell ran
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    """Everything the cells printed or displayed as text."""
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.output_type == "stream":
                parts.append(o.text)
            elif "data" in o:
                parts.append(o.data.get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "cloud-dataset.ipynb"])
def test_notebooks_are_stored_valid_and_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert all("assert " in c.source for c in code)  # each code cell checks what it did


@pytest.mark.slow
def test_quickstart_notebook(kernel):
    text = _text(_execute("quickstart.ipynb", kernel))
    assert "Paris" in text
    assert "<PipelineJob 'quickstart' finished: 8/8 rows," in text
    assert "Glinthawk dashboard: http" in text and "/glinthawk" in text


def test_cloud_dataset_notebook(kernel):
    text = _text(_execute("cloud-dataset.ipynb", kernel))
    assert "<PipelineJob 'cloud-demo' finished: 12/12 rows, shards 3/3, 1 errors" in text
    assert "14 rows -> s3://glinthawk-demo/exports/cloud-demo.parquet" in text
