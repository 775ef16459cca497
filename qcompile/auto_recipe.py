"""TEMPORARY (replaced by the mixed-precision branch): AutoRecipe's data."""
from .mixed import AutoRecipe, Quality  # noqa: F401
