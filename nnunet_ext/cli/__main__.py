"""``python -m nnunet_ext.cli ARGS`` runs the ``nnunet-ext`` command."""
from nnunet_ext.cli.main import main

main()
