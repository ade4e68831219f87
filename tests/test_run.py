from __future__ import annotations

import json
from pathlib import Path

import pytest

from hierclass.errors import HierclassError
from hierclass.run import Run
from hierclass.taxonomy import Taxonomy

ROWS = [(1, "A", "a, with comma", 'x "quoted"'), (2, "A", "a, with comma", "y"), (3, "B", "b", "z")]


def test_run_copies_its_taxonomy_and_refuses_another(tmp_path: Path) -> None:
    tax = Taxonomy.from_rows(ROWS)
    run = Run(tmp_path / "run")
    assert run.taxonomy_copy() is None and run.manifest() == {}
    run.adopt_taxonomy(tax)
    copy = run.taxonomy_copy()
    assert copy is not None and copy.fingerprint == tax.fingerprint and copy.rows == tax.rows
    run.adopt_taxonomy(Taxonomy.from_rows(list(reversed(ROWS))))  # the same taxonomy: fine
    with pytest.raises(HierclassError, match="holds heads of taxonomy .*; train into another run folder"):
        run.adopt_taxonomy(Taxonomy.from_rows([*ROWS, (4, "C", "c", "w")]))
    run.record_head("flat", {"metrics": {"holdout_acc": 0.5}})
    run.record_head("router", {"metrics": {"holdout_acc": 0.9}})
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["taxonomy"] == {"file": "category_names.csv", "fingerprint": tax.fingerprint}
    assert set(manifest["heads"]) == {"flat", "router"} and "trained_at" in manifest["heads"]["flat"]
    (tmp_path / "run" / "run.json").write_text("{")
    with pytest.raises(HierclassError, match="unreadable run manifest"):
        run.manifest()
