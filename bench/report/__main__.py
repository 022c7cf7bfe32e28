"""``python -m bench.report [results/<preset> ...]``: rebuild the reports from the CSVs."""

import sys
from pathlib import Path

from . import claims, sweep_dirs, update_readme, write_report


def main(argv: list[str]) -> None:
    dirs = argv or sweep_dirs()
    for d in dirs:
        write_report(d)
        print(f"wrote {d}/summary.md and plots")
    if not argv:
        Path("results/claims.md").write_text(claims("results"))
        print("wrote results/claims.md")
    if not argv and update_readme():
        print("updated README.md results section")


if __name__ == "__main__":
    main(sys.argv[1:])
