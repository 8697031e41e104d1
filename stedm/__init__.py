"""STEDM: style-extracting diffusion models and diffusion self-supervision for histopathology segmentation."""

import os as _os

# albumentations asks PyPI for a newer version at import (one HTTPS connection per script start,
# a warning on offline nodes) unless this is set; STEDM runs offline and pins its versions.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

from stedm.compat import install as _install_moved_modules  # noqa: E402
from stedm.config import register_resolvers as _register_resolvers  # noqa: E402

_register_resolvers()
_install_moved_modules()  # old module paths (configs, checkpoints) keep importing: stedm/compat.py
