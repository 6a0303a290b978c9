"""Old name of :mod:`kodalle_cli.model.sampling`, kept only until ``kodalle_cli/train/dalle.py``
imports the new name; delete this file then."""

from kodalle_cli.model.sampling import SamplingSettings, generate_codes, row_uniforms

__all__ = ["SamplingSettings", "generate_codes", "row_uniforms"]
