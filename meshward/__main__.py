"""``python -m meshward``: the CLI (how ``meshward authz`` starts its shipper child)."""

from meshward.cli import main

main()
