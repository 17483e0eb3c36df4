"""``python -m apparate``: the ``apparate`` command."""

from apparate.cli import main

raise SystemExit(main())
