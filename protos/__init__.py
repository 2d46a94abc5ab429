"""recfunnel's gRPC contracts (`package recfunnel.v1`) and their generated Python code."""
