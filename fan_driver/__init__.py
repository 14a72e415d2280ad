"""Fan networking for Docker: a libnetwork remote network driver and IPAM driver."""

__version__ = "0.1.0"
