"""``python -m folklm.datasets [list | path NAME... | source NAME]``: the shipped data files.

``path`` prints a readable file for each name (decompressed into ``$FOLK_HOME/datasets``),
for commands that take a file: ``folk perplexity M --data "$(python -m folklm.datasets path
wikitext2_raw_test/wiki.test.raw)"``.
"""

from __future__ import annotations

import sys

from folklm import datasets
from folklm.errors import FolkError


def main(argv: list[str]) -> int:
    if (
        not argv
        or argv[0] not in ("list", "path", "source")
        or (argv[0] != "list" and len(argv) < 2)
    ):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        if argv[0] == "list":
            for name in datasets.names():
                e = datasets.manifest()[name]
                print(f"{name}\t{e['bytes']}")
        elif argv[0] == "path":
            for name in argv[1:]:
                print(datasets.path(name))
        else:
            print(datasets.source(argv[1]), end="")
    except FolkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... list | head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
