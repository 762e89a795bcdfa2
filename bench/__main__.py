"""`python -m bench`: see `bench.harness`."""

from .harness import main

raise SystemExit(main())
