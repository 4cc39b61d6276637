"""``randhie-prepare OUT_DIR``: every site's data files and ``site.yaml``, and the
coordinator's held-out file, from the RAND HIE table statsmodels ships.

Writes, for the federation config in ``OUT_DIR`` (``sites/<plan>/site.yaml`` and
``holdout: holdout.parquet`` relative to it)::

    OUT_DIR/holdout.parquet                 the coordinator's own held-out sample
    OUT_DIR/sites/<plan>/train.parquet      the site's training rows (Parquet)
    OUT_DIR/sites/<plan>/test.csv           the site's test rows (CSV: both formats work)
    OUT_DIR/sites/<plan>/site.yaml          the site's settings

Each ``site.yaml`` points the site at the object store under the state directory
(``--state-dir``, default ``$FEDROUND_STATE_DIR`` or ``.fedround``), the one the coordinator
uses when ``fedround run`` runs the sites on this machine. In a real consortium each plan
would write its own ``site.yaml`` next to data it already holds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from .data import PLANS, load_randhie, split

FEDERATION = "randhie"


def site_settings(site: str, state_dir: Path, federation: str) -> dict[str, object]:
    return {
        "site": site,
        "federation": federation,
        "data_dir": ".",
        "train_file": "train.parquet",
        "test_file": "test.csv",
        "object_store": {"kind": "local", "root": str(state_dir.resolve() / "objects")},
    }


def prepare(
    out_dir: Path, state_dir: Path, seed: int = 2024, federation: str = FEDERATION
) -> dict[str, tuple[int, int]]:
    """Write the files; returns every site's (train, test) row counts."""
    parts = split(load_randhie(), seed=seed)
    counts = {}
    for site, (train, test) in parts.sites.items():
        folder = out_dir / "sites" / site
        folder.mkdir(parents=True, exist_ok=True)
        train.to_parquet(folder / "train.parquet", index=False)
        test.to_csv(folder / "test.csv", index=False)
        settings = site_settings(site, state_dir, federation)
        (folder / "site.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        counts[site] = (len(train), len(test))
    parts.holdout.to_parquet(out_dir / "holdout.parquet", index=False)
    counts["holdout"] = (len(parts.holdout), 0)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="randhie-prepare",
        description="Write the RAND HIE federation's site files, site.yaml files and the "
        "coordinator's held-out file (from the data statsmodels ships; nothing is downloaded).",
    )
    parser.add_argument("out_dir", type=Path, help="the folder of the federation config")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("FEDROUND_STATE_DIR", ".fedround")),
        help="fedround's state directory (default: $FEDROUND_STATE_DIR or .fedround)",
    )
    parser.add_argument("--seed", type=int, default=2024, help="seed of the splits")
    parser.add_argument("--federation", default=FEDERATION, help="the federation's name")
    args = parser.parse_args(argv)
    counts = prepare(args.out_dir, args.state_dir, args.seed, args.federation)
    names = {plan.site: plan.description for plan in PLANS}
    lines = [f"randhie-prepare: {args.out_dir}"]
    for site, (train, test) in counts.items():
        what = names.get(site, "the coordinator's own held-out sample")
        rows = f"{train:>5} train, {test:>5} test" if site != "holdout" else f"{train:>5} rows"
        lines.append(f"  {site:<13} {rows}   {what}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
