"""The base layer: the package's one exception type, atomic files, lazy exports and the torch
helpers (eval mode, unwrapping, devices) that every other layer imports from here."""

from xai_sparsity.base.errors import XaiSparsityError

__version__ = "0.1.0"

__all__ = ["XaiSparsityError", "__version__"]
