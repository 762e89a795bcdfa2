"""`python -m substrate_db.cli`: the same as the `substrate-db` console script."""

from . import main

main()
