"""The package version (one place: the package, its commands and its export manifests read it here)."""
__version__ = "0.1.0"
