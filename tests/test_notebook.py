"""notebooks/scaling_laws.ipynb executes top to bottom at its smoke scale (a real mini IsoFLOP sweep: 13 training runs,
fits, plots, the held-out prediction and the accuracy stage) and prints the fitted exponent."""

import math
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "scaling_laws.ipynb"


def printed_text(nb: nbformat.NotebookNode) -> str:
    """Everything the code cells printed (streams and plain-text results)."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type in ("execute_result", "display_data"):
                parts.append(output.data.get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.long
def test_notebook_runs_at_smoke_scale_and_prints_alpha(tmp_path, monkeypatch):
    stored = NOTEBOOK.read_bytes()
    monkeypatch.setenv("SWEEP_SCALE", "smoke")
    monkeypatch.setenv("SWEEP_DIR", str(tmp_path / "sweep"))  # absolute: the training runs stay out of the repository
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device per process, as on a user's machine (conftest sets 8)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})  # run from notebooks/, as Jupyter
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # the executed copy, to look at when this test fails

    assert NOTEBOOK.read_bytes() == stored  # the committed notebook and its full-sweep outputs are untouched
    text = printed_text(nb)
    match = re.search(r"^alpha = (\S+)$", text, re.MULTILINE)
    assert match, f"no `alpha = <number>` line in the notebook's output:\n{text[-3000:]}"
    assert math.isfinite(float(match.group(1)))
    assert "SWEEP_SCALE=smoke" in text and "Llama 3 paper" in text and "prediction error: predicted" in text
    runs = sorted(p.name for p in (tmp_path / "sweep" / "runs").iterdir())
    assert len(runs) == 13 and all((tmp_path / "sweep" / "runs" / r / "eval.json").is_file() for r in runs)
