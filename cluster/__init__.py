"""Cluster: Ray actors around the services, their placement, the demo and the `recfunnel` CLI."""
