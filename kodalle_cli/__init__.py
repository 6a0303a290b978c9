"""kodalle: DALL-E-1 style text-to-image training on small domain data sets.

The text encoder is the token and position embedding tables of a pretrained language
model, provided by backbone plugins (see :mod:`kodalle_cli.hookspecs`).
"""

from kodalle_cli.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
