"""`inspect`: what each stage left in a run directory, and `--verify`, the check of every store against its schema."""
