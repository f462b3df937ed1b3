"""Serving: the Open Inference Protocol (KServe v2) REST server with hot-swap of registry versions."""
