"""STEDM: style-extracting diffusion models and diffusion self-supervision for histopathology segmentation."""

__version__ = "0.1.0"

from stedm.config import register_resolvers as _register_resolvers

_register_resolvers()
