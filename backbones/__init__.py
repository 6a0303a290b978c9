"""kodalle's built-in backbone plugins.

Each module is registered through the ``kodalle`` entry-point group in pyproject.toml,
exactly as a third-party plugin is; kodalle's core never imports them by name.
"""
