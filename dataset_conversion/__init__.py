"""Converters from public MS / WMH challenge layouts to nnU-Net raw datasets (``nnunet-ext convert ...``).

Installed as ``nnunet_ext.dataset_conversion``. Converters only read the source folder."""
