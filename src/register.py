"""CLI: register a sweep's already-scored winner, without touching the test split again.

    python -m src.register --run-id <parent run id> [--model-name NAME] [--tracking-uri URI]

For a final test run with --no-register, or one whose registration failed: the model the final
test scored becomes the next version of NAME (default: the study's name) with alias
`champion` (src/registry.py says what the version carries). A scoring is registered once.
"""
from __future__ import annotations

import argparse
import sys

from .errors import UserError
from .registry import register_winner
from .tracking import ROLE, Tracker


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.register", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", required=True, help="the sweep's parent run id")
    p.add_argument("--model-name", help="registered model name (default: the study's name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI the sweep used (default: MLflow's own)")
    args = p.parse_args(argv)
    try:
        tracker = Tracker(args.tracking_uri)
        tracker.check_reachable()
        run = tracker.get_run(args.run_id)
        if run.data.tags.get(ROLE) != "parent":
            raise UserError(f"run {args.run_id} is not a sweep's parent run (tag {ROLE} is "
                            f"{run.data.tags.get(ROLE)!r}); pass the parent run id the sweep printed")
        name, version = register_winner(tracker, args.run_id, args.model_name)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"registered: models:/{name}@champion (version {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
