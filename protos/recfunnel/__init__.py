"""Namespace for the `recfunnel.*` proto packages."""
