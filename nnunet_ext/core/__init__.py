"""Core: file and image input/output, atomic writes and locks, argument and input checks, errors, paths,
process guard, progress output and plotting. Imports nothing else of nnunet-ext (docs/architecture.md)."""
