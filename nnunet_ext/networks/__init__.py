"""Network parts that nnunet-ext puts into the architectures nnU-Net plans."""
