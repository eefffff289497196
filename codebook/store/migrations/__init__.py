"""Alembic migrations of the prototype store (``env.py``, ``versions/``).

Run them through :mod:`codebook.store.migrate` (``upgrade(url)``) or ``recsys db upgrade``;
no ``alembic.ini`` is needed: the configuration is built in code and points
``script_location`` at this folder, so it works from an installed package too.

A new revision, after changing :mod:`codebook.store.models`::

    python -c "from codebook.store.migrate import revision; revision('what changed')"

then read and edit the generated file under ``versions/`` before committing it.
"""
