"""``python -m pclseg`` (and ``torchrun -m pclseg pretrain ...``) runs the command line."""

from .cli import main

raise SystemExit(main())
