"""Re-pin the golden numbers: ``python tests/golden/regenerate.py`` runs the golden command and rewrites
smollm2_3_layers.json. Only after a change that is meant to move the numbers, stated in its commit."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
GOLDEN = HERE / "smollm2_3_layers.json"


def main():
    from allocator import Allocation, Tables

    gold = json.loads(GOLDEN.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "allocator", *gold["command"].split()[3:], f"hydra.run.dir={run}"],
                       check=True)
        alloc, tables = Allocation.from_json(run / "allocation.json"), Tables.load(run / "tables")
        summary = json.loads((run / "summary.json").read_text())
    gold.update(units=list(alloc.units), level_index=list(alloc.level_index),
                levels=[lv.to_dict() for lv in alloc.levels], degradation=tables.degradation.tolist(),
                level_grid=tables.levels.to_dict(orient="records"), measurements=summary["measurements"])
    GOLDEN.write_text(json.dumps(gold, indent=1))


if __name__ == "__main__":
    main()
