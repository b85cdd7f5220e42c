"""Frontends: use an exported refiner outside rsc's own sampler (plain diffusers pipelines, ...)."""
