"""Migration scripts, applied in order by Alembic (a package so it ships with the wheel)."""
