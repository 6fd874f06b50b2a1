"""``pyserve compress RECIPE -o OUT.pyserve [--report DIR]``: run a compression recipe and print the report
(with ``--report``, also write report.json, report.md and PNG plots into DIR).

Exit status: 0 done (targets met or none set); 2 unusable recipe, data or output path (one line
on stderr, nothing written); 3 a target of the recipe's ``evaluate`` section was missed (the
artifact and the report are written all the same; one line on stderr says which target).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TARGET_MISSED = 3  # exit status when an evaluate target was missed (the artifact is written)


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="compress a model with a recipe (Deep Compression) into a .pyserve artifact",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML file (see examples/lenet300/recipe.yaml)")
    p.add_argument("-o", "--output", required=True, help="artifact file to write (.pyserve)")
    p.add_argument("--report", metavar="DIR",
                   help="write report.json, report.md and PNG plots here (needs matplotlib: pyserve[report])")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pyserve.cli import UsageError
    from pyserve.compress import RecipeError, compress, load_recipe

    out = Path(args.output)
    if out.is_dir():
        raise UsageError(f"{out}: is a directory; give the artifact's file name")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{out}: cannot write there: {parent} is not a directory")
    report_dir = Path(args.report) if args.report else None
    if report_dir is not None:
        if report_dir.exists() and not report_dir.is_dir():
            raise UsageError(f"--report: {report_dir} exists and is not a directory")
        try:
            import matplotlib  # noqa: F401  (checked before hours of training, used by the report)
        except ImportError:
            raise UsageError("--report: needs matplotlib; pip install 'pyserve[report]'") from None
    try:
        recipe = load_recipe(args.recipe)
        result = compress(recipe, args.output, verbose=not args.quiet)
    except RecipeError as exc:
        msg = str(exc)
        if not msg.startswith(str(args.recipe)):  # errors found after loading name the file too
            msg = f"{args.recipe}: {msg}"
        raise UsageError(msg) from None
    except OSError as exc:
        raise UsageError(f"{args.output}: cannot write artifact: {exc.strerror or exc}") from None
    print(result.table)
    print(f"wrote {result.path} ({result.artifact_bytes} bytes)")
    if report_dir is not None:
        from pyserve.compress.report import write_report

        try:
            report = write_report(result, report_dir)
        except OSError as exc:
            raise UsageError(f"--report: cannot write {report_dir}: {exc.strerror or exc}") from None
        print(f"wrote report {report_dir / 'report.md'} ({len(report['plots'])} plots)")
    if not result.target_met:
        print(f"pyserve compress: target missed: {'; '.join(result.evaluation['missed'])} "
              f"(artifact written to {result.path})", file=sys.stderr)
        return TARGET_MISSED
    return 0
