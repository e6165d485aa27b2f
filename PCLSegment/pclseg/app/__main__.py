"""``python -m pclseg.app [FOLDER]``: the same as ``pclseg app``."""

from .serve import main

raise SystemExit(main())
