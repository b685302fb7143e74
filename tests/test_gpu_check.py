"""benchmarks/gpu_check.py in its CPU form (``--device cpu --tiny``), so the script a GPU session runs cannot rot:
it prints its tables, edits with every method at batch 1 and 100 without NaN, passes its precision checks (C from
bf16 weights vs float32, the float64 solve), and imports no MLflow, Ray or FAISS (a GPU machine may have none)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_form_prints_its_tables_and_passes(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out_file = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--json", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "statistics C, layers" in printed and "tokens/s" in printed and "precision path:" in printed
    results = json.loads(out_file.read_text())
    cells = {(c["method"], c["batch_size"]) for c in results["cells"]}
    assert cells == {(m, b) for m in ("memit", "alphaedit", "ultraedit", "grace") for b in (1, 100)}
    assert all(c["editor_state_on_model_device"] for c in results["cells"] if c["method"] == "grace")
    assert all(c["finite"] and c["seconds_per_edit"] > 0 for c in results["cells"])
    assert all(c["vstar_seconds_per_edit"] + c["solve_seconds_per_edit"] <= c["seconds_per_edit"] * 1.01
               for c in results["cells"])
    checks = results["precision"]
    assert len(checks) == 3 and all(c["ok"] for c in checks)
    assert checks[0]["relative_error"] > 0  # bf16 keys really differ from float32 ones: the path ran in bf16


def test_gpu_check_imports_no_tracking_scheduler_or_index():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'ray', 'faiss'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
