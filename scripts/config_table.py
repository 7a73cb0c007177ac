"""The configuration table of docs/configuration.md: every run-config key, its default, its help.

The table is generated from the key declarations in `fl_app.config`; the page
holds it between two marker comments, and ``tests/test_config.py`` fails when
the two drift apart.

Usage: python scripts/config_table.py [--write]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fl_app.config import fields, flower_key

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
REGENERATE = "python scripts/config_table.py --write"


def markdown_table() -> str:
    """Every key, its default and its help, as a markdown table for docs/configuration.md.

    The help's links are written from the repository's root; the page sits in
    docs/, so ``](docs/`` loses its folder.
    """
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for spec in fields():
        default = spec.default
        shown = f"`{default}`" if isinstance(default, str) else str(default).lower()
        meaning = spec.metadata["help"].replace("](docs/", "](")
        lines.append(f"| `{flower_key(spec)}` | {shown} | {meaning} |")
    return "\n".join(lines)


def split_page(page: str) -> tuple[str, str, str]:
    """``page`` around its table: the text before the start marker, the table, the text after.

    Raises ``ValueError`` when a marker is missing.
    """
    head, start, rest = page.partition(START)
    table, end, tail = rest.partition(END)
    if not (start and end):
        raise ValueError(f"{PAGE} has no {START} ... {END} markers around its table")
    return head, table.strip("\n"), tail


def main(argv: list[str] | None = None) -> None:
    """Print the table, or with ``--write`` replace the one in docs/configuration.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write", action="store_true", help="replace the table in docs/configuration.md"
    )
    args = parser.parse_args(argv)
    table = markdown_table()
    if not args.write:
        print(table)
        return
    head, old, tail = split_page(PAGE.read_text(encoding="utf-8"))
    PAGE.write_text(f"{head}{START}\n{table}\n{END}{tail}", encoding="utf-8")
    print(f"{PAGE}: {'unchanged' if old == table else 'table rewritten'}")


if __name__ == "__main__":
    main()
