"""Runtime of compiled models: per-model state, guarded regions, graph runners."""
