"""Tables printed after a run (`knnd run`, `knnd demo`)."""
from __future__ import annotations

from pipeline.files import read_json
from pipeline.runner import stage_dir


def print_table(cfg, names) -> None:
    """Each finished stage's items, seconds and items/s."""
    print(f"\n{'stage':<11} {'items':>9} {'seconds':>9} {'items/s':>9}")
    for name in names:
        path = stage_dir(cfg, name) / "manifest.json"
        if not path.exists():
            continue
        m = read_json(path)
        items, seconds = m.get("items", 0), m.get("seconds", 0.0)
        rate = f"{items / seconds:.1f}" if seconds else "-"
        print(f"{name:<11} {items:>9} {seconds:>9.1f} {rate:>9}")
