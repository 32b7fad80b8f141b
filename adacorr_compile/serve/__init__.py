"""adacorr_compile.serve: an inference service for the reference models on Ray Serve.

``adacorr serve --model reference-dit`` (or :func:`adacorr_compile.serve.app.run_service`) starts
it. The parts: :mod:`.schema` (request validation, pure), :mod:`.engine` (the compiled model,
warm-up and batched generation; no Ray), :mod:`.metrics` (Prometheus), :mod:`.app` (the Ray
Serve deployment and HTTP routes). Nothing here is imported by ``import adacorr_compile``; Ray
and prometheus_client are imported only by :mod:`.app` and :mod:`.metrics` (the ``serve`` extra).
"""

SERVE_PACKAGES = ("ray", "prometheus_client", "diffusers", "safetensors")
SERVE_INSTALL = 'pip install "adacorr_compile[serve]"'


def require_serve(feature: str = "adacorr serve") -> None:
    """Raise :class:`~adacorr_compile.extras.LabMissing` naming the missing packages of the
    ``serve`` extra and the command that installs them."""
    import importlib.util

    from ..extras import LabMissing

    absent = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if absent:
        raise LabMissing(f"{feature} needs the serve extra ({', '.join(absent)} not installed): {SERVE_INSTALL}")


_LAZY = {"ServeConfig": "config", "make_config": "config", "Engine": "engine", "Limits": "schema",
         "build_app": "app", "start": "app", "stop": "app"}


def __getattr__(name: str):
    """``adacorr_compile.serve.start(...)`` and friends, imported on first use (Ray only by ``app``)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Engine", "Limits", "ServeConfig", "build_app", "make_config", "require_serve", "start", "stop"]
