"""The training engine of METHOD.md section 3 (filled in as the pieces land)."""
