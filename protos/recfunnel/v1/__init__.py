"""Generated code for `package recfunnel.v1`; regenerate with `python -m protos.generate`."""
