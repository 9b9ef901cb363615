"""Checkpoints: the format (the components' union, checksums), the single-file and DCP writers,
and the manager that picks between them."""
