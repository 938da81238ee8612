"""headforge: photos of people in, 3D head assets out."""

__version__ = "0.1.0"
