"""Data files shipped with qwenlite (installed as ``qwenlite.models_data``): ``manifest.json``, the
known models for ``qwenlite pull``. Read them with ``importlib.resources``, not by path."""
