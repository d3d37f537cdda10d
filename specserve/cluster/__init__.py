"""GPUStack-style control plane: inference backends, deployments, workers, gateway, web UI."""
