"""`python -m lmforge ...` (and `torchrun -m lmforge ...`) run the same CLI as `lmforge ...`."""

from lmforge.cli import main

main()
