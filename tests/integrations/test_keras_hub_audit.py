"""reproductions/keras_hub_audit.py --quick: two keras-hub tasks audited, the table written.

keras-hub's `BertTextClassifier` and `GPT2CausalLM` compile a mean loss:
the audit must find them invariant (exponent 0, replica factors 1), and
write a row for each to its table and CSV. Needs keras-hub.
"""

import csv
import importlib.util
import os

import pytest

pytest.importorskip("keras_hub")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_audit():
    path = os.path.join(ROOT, "reproductions", "keras_hub_audit.py")
    spec = importlib.util.spec_from_file_location("keras_hub_audit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_audit_finds_the_mean_losses_invariant(tmp_path):
    audit = load_audit()
    rows = audit.main(["--quick", "--out", str(tmp_path)])
    assert [row["task"] for row in rows] == list(audit.QUICK)
    for row in rows:
        assert row["verdict"] == "invariant", row
        assert abs(row["exponent"]) < 1e-6
        assert row["replica_equal"] == pytest.approx(1.0, rel=1e-5)
        assert row["replica_split"] == pytest.approx(1.0, rel=1e-5)
        assert row["accumulation"] == pytest.approx(1.0, rel=1e-3)
    with open(tmp_path / "audit.csv") as f:
        assert [r["task"] for r in csv.DictReader(f)] == list(audit.QUICK)
    table = (tmp_path / "table.md").read_text()
    assert "| GPT2CausalLM |" in table and "| BertTextClassifier |" in table


def test_groups_cover_every_task_class():
    """Each keras-hub task class is in exactly one loss group."""
    import keras_hub

    audit = load_audit()
    groups = audit.loss_groups()
    members = [name for names in groups.values() for name in names]
    assert len(members) == len(set(members))
    assert "DFineObjectDetector" in members and "GPT2CausalLM" in members
    key = audit.group_of("DFineObjectDetector", groups)
    assert "DFineObjectDetector.compute_loss" in key
    tasks = [n for n in dir(keras_hub.models)
             if isinstance(getattr(keras_hub.models, n), type)
             and issubclass(getattr(keras_hub.models, n), keras_hub.models.Task)
             and getattr(keras_hub.models, n) is not keras_hub.models.Task]
    assert sorted(members) == sorted(tasks)


def test_unknown_task_is_refused():
    audit = load_audit()
    with pytest.raises(SystemExit):
        audit.main(["--tasks", "NoSuchTask", "--no-docs"])
