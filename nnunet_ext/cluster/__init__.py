"""Running commands as jobs: the local and Slurm launcher, ``nnunet-ext jobs``, and
``python -m nnunet_ext.cluster.call`` (one function of the package as a job step)."""
