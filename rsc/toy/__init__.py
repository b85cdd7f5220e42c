"""The toy world: a small biased text-to-image model, built and measured on a CPU."""
